"""``llama.cpp-spec:TYPE[:N]``: llama.cpp's built-in speculation, run by its own tool.

Each generation is one run of ``llama-speculative-simple`` (built by
``ltd peers build llama.cpp``) on the target's GGUF file, greedy (``--temp 0``). The
tool reads the prompt as text and tokenizes it with special tokens parsed, so the
prompt is our chat-templated token ids decoded back to text; the tool prints the prompt
pieces, then the generated pieces, on stdout, and its timings and draft counts on
stderr. The output token ids are the generated text re-tokenized with the target's
tokenizer (the tool does not print ids); the text is compared as well.

What N means per type (the draft length, with llama.cpp's other defaults kept):
draft-simple / draft-eagle3 ``--spec-draft-n-max N``; ngram-simple / ngram-map-k /
ngram-map-k4v the draft m-gram size ``--spec-ngram-*-size-m N``; ngram-mod
``--spec-ngram-mod-n-max N`` with ``n-min`` at the shipped 3/4 of it.

``llama.cpp-spec:none`` is the same tool with a drafter that never proposes anything
(ngram-mod with a 1024-token lookup): llama.cpp's own greedy loop, one token per step,
with the prompt processed exactly as in the speculative runs. It is the reference the
speculative types must equal token for token: llama.cpp's plain tools decode the whole
prompt in one batch, which changes the numbers slightly and flips near-ties.
"""

from __future__ import annotations

import logging
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ltd.errors import LtdError

log = logging.getLogger(__name__)

KIND = "llama.cpp-spec"
SPEC_TYPES = ("draft-simple", "draft-eagle3", "ngram-simple", "ngram-map-k", "ngram-map-k4v", "ngram-mod", "none")
NO_DRAFT = "none"
NO_DRAFT_ARGS = ("--spec-type", "ngram-mod", "--spec-ngram-mod-n-match", "1024")  # never matches
MODEL_DRAFT_TYPES = ("draft-simple", "draft-eagle3")
DEFAULT_GRID_TYPES = ("ngram-simple", "ngram-map-k", "ngram-mod", "draft-simple", "draft-eagle3")
DEFAULT_GRID_LENGTHS = (3, 6, 10)
MAX_DRAFT = 256
CONTEXT_MARGIN = 64  # tokens of room past prompt + output for the last draft


@dataclass(frozen=True)
class PeerSpec:
    """One llama.cpp speculative configuration; ``n`` 0 keeps llama.cpp's default."""

    type: str
    n: int = 0

    @property
    def label(self) -> str:
        return f"{KIND}:{self.type}" + (f":{self.n}" if self.n else "")

    def type_args(self) -> list[str]:
        """The tool flags that select this type and its draft length."""
        if self.type == NO_DRAFT:
            return list(NO_DRAFT_ARGS)
        args = ["--spec-type", self.type]
        if not self.n:
            return args
        n = str(self.n)
        if self.type in MODEL_DRAFT_TYPES:
            return args + ["--spec-draft-n-max", n]
        if self.type == "ngram-mod":
            return args + ["--spec-ngram-mod-n-max", n, "--spec-ngram-mod-n-min", str(max(1, 3 * self.n // 4))]
        return args + [f"--spec-{self.type}-size-m", n]


def parse_peer_arg(text: str) -> PeerSpec:
    """``TYPE[:N]`` after ``llama.cpp-spec:``; errors list the valid types."""
    kind_help = f"write {KIND}:TYPE[:N] with TYPE one of {', '.join(SPEC_TYPES)}"
    typ, _, n_text = text.partition(":")
    if not typ:
        raise LtdError(f"bad method {KIND}:{text}: {kind_help}")
    if typ not in SPEC_TYPES:
        raise LtdError(f"unknown llama.cpp speculative type {typ!r}; {kind_help}")
    if not n_text:
        return PeerSpec(typ)
    if typ == NO_DRAFT:
        raise LtdError(f"bad method {KIND}:{text}: {KIND}:{NO_DRAFT} drafts nothing and takes no N")
    if not n_text.isdigit() or not 1 <= int(n_text) <= MAX_DRAFT:
        raise LtdError(f"bad method {KIND}:{text}: N is a draft length from 1 to {MAX_DRAFT}")
    return PeerSpec(typ, int(n_text))


def grid_peers(types: Sequence[str], lengths: Sequence[int]) -> list[PeerSpec]:
    """The no-draft reference first, then every type at every draft length, each
    validated like a user-given spec."""
    return [PeerSpec(NO_DRAFT)] + [parse_peer_arg(f"{t}:{n}") for t in types if t != NO_DRAFT for n in lengths]


# -- running -------------------------------------------------------------------------

_DECODED = re.compile(r"decoded\s+(\d+) tokens in\s+([\d.]+) seconds")
_ENCODED = re.compile(r"encoded\s+(\d+) tokens in\s+([\d.]+) seconds")
_DRAFTED = re.compile(r"n_drafted\s*=\s*(\d+)")
_ACCEPT = re.compile(r"n_accept\s*=\s*(\d+)")
_PREDICT = re.compile(r"n_predict\s*=\s*(\d+)")
_PLAIN = re.compile(r"decoded (\d+) tokens in ([\d.]+) s")


@dataclass
class ToolRun:
    """What one run of a llama.cpp tool reported."""

    text: str
    n_predict: int
    seconds: float  # prompt encode + decode, model load excluded
    n_drafted: int = 0
    n_accept: int = 0
    n_prompt: int = 0  # prompt tokens as the tool tokenized them (0 = not reported)

    @property
    def cycles(self) -> int:
        """Target verifications: every cycle adds its accepted drafts plus one token."""
        return max(self.n_predict - self.n_accept, 0)

    @property
    def acceptance_rate(self) -> float:
        return self.n_accept / self.n_drafted if self.n_drafted else 0.0


def split_output(stdout: str, prompt_text: str) -> str:
    """The generated text: stdout is ``\\n\\n`` + prompt pieces + output + blank lines."""
    body = stdout[2:] if stdout.startswith("\n\n") else stdout
    if body.startswith(prompt_text):
        body = body[len(prompt_text):]
    else:
        at = body.find(prompt_text)
        if at < 0:
            raise LtdError("llama.cpp's tool did not echo the prompt as given, so its output cannot be separated; "
                           "rebuild the peers (ltd peers build llama.cpp) or drop llama.cpp-spec from --methods")
        body = body[at + len(prompt_text):]
    return body[:-4] if body.endswith("\n\n\n\n") else body.rstrip("\n")


def parse_spec_run(stdout: str, stderr: str, prompt_text: str) -> ToolRun:
    """Parse ``llama-speculative-simple`` output (see the module docstring)."""
    dec, enc = _DECODED.search(stderr), _ENCODED.search(stderr)
    drafted, accept = _DRAFTED.search(stderr), _ACCEPT.search(stderr)
    if not (dec and enc and drafted and accept):
        last = (stderr.strip().splitlines() or ["no output"])[-1]
        raise LtdError(f"llama.cpp speculative run failed: {last.strip()[:300]}")
    return ToolRun(
        text=split_output(stdout, prompt_text),
        n_predict=int(dec.group(1)),
        seconds=float(enc.group(2)) + float(dec.group(2)),
        n_drafted=int(drafted.group(1)),
        n_accept=int(accept.group(1)),
        n_prompt=int(enc.group(1)),
    )


def spec_command(
    binary: Path,
    spec: PeerSpec,
    target_gguf: Path,
    prompt_text: str,
    max_new_tokens: int,
    context: int,
    threads: int,
    draft_gguf: Path | None = None,
    seed: int = 0,
    exact: bool = False,
) -> list[str]:
    """The full command line of one greedy speculative generation.

    Flash attention is off, as in the ltd backend's contexts (its CPU kernel rounds
    differently, so the tool would compute another text than plain decoding). ``exact``
    (the ltd backend's exact mode) also turns off repacked weights, another kernel for
    batches of 4+ rows; the caller's environment carries ``GGML_CPU_TILED_MM=0``.
    """
    if spec.type in MODEL_DRAFT_TYPES and draft_gguf is None:
        raise LtdError(f"{spec.label} needs a draft model GGUF")
    cmd = [
        # --no-escape: the prompt is passed as is (the tool would turn a literal "\\n" in
        # code prompts into a newline, and generate from another prompt than ours)
        str(binary), "-m", str(target_gguf), "-p", prompt_text, "--no-escape", "-n", str(max_new_tokens),
        "-c", str(context), "-b", str(max(context, 512)), "-ub", "512",
        "-t", str(threads), "-tb", str(threads), "--temp", "0", "--seed", str(seed), "-fa", "off", *spec.type_args(),
    ]
    if exact:
        cmd.append("--no-repack")
    if draft_gguf is not None:
        cmd += ["-md", str(draft_gguf), "-td", str(threads), "-tbd", str(threads)]
    return cmd


def run_tool(cmd: list[str], timeout: float = 3600.0) -> tuple[str, str]:
    """Run a llama.cpp tool; a crash is a one-line error with its last message."""
    log.debug("running %s", " ".join(cmd[:3]))
    try:
        res = subprocess.run(cmd, capture_output=True, timeout=timeout)
    except FileNotFoundError:
        raise LtdError(f"{cmd[0]} is missing; run: ltd peers build llama.cpp") from None
    out = res.stdout.decode("utf-8", errors="replace")
    err = res.stderr.decode("utf-8", errors="replace")
    if res.returncode != 0:
        last = (err.strip().splitlines() or ["no output"])[-1]
        raise LtdError(f"{Path(cmd[0]).name} exited with {res.returncode}: {last.strip()[:300]}")
    return out, err


def parse_plain_run(stdout: str, stderr: str, prompt_text: str) -> ToolRun:
    """Parse ``llama-simple`` (plain greedy) output: prompt + output on stdout."""
    m = _PLAIN.search(stderr)
    if not m:
        last = (stderr.strip().splitlines() or ["no output"])[-1]
        raise LtdError(f"llama.cpp plain run failed: {last.strip()[:300]}")
    body = stdout
    if body.startswith(prompt_text):
        body = body[len(prompt_text):]
    return ToolRun(text=body[:-1] if body.endswith("\n") else body, n_predict=int(m.group(1)), seconds=float(m.group(2)))
