"""Training-time test (unrolled) logits must equal what the drafter computes at inference.

If the TTT attention mask, positions or hidden-state shift in the trainer disagreed with
the drafter's tree attention, a head would be trained for a different computation than
the one it runs; this pins the two together.
"""

import json

import pytest
import torch
from transformers import LlamaConfig

from ltd.drafting.eagle3 import Eagle3Config, Eagle3Drafter, init_random_head
from ltd.train.trainer import TrainConfig, sequence_loss, ttt_mask, unrolled_forward
from ltd.tree import Tree


def _tiny():
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    hcfg = Eagle3Config.for_target(cfg, draft_vocab_size=40)
    hcfg.eagle_aux_hidden_state_layer_ids = [1, 2, 3]
    torch.manual_seed(0)
    draft_ids = torch.sort(torch.randperm(96)[:40]).values
    head = init_random_head(hcfg, seed=1, draft_ids=draft_ids)
    embed = torch.nn.Embedding(96, 32)
    return cfg, head, embed


def test_ttt_mask_shape_and_content():
    m = ttt_mask(5, 3, "cpu")
    assert m.shape == (5, 15)
    # query t=4 at step 3 sees K1[0..2], K2[3], K3[4]
    assert m[4, :5].tolist() == [True, True, True, False, False]
    assert m[4, 5:10].tolist() == [False, False, False, True, False]
    assert m[4, 10:].tolist() == [False, False, False, False, True]


def test_unrolled_logits_match_inference_drafter():
    _, head, embed = _tiny()
    T = 12
    g = torch.Generator().manual_seed(3)
    seq = {
        "input_ids": torch.randint(0, 96, (T,), generator=g),
        "features": torch.randn(T, 3 * 32, generator=g),
    }
    with torch.no_grad():
        logits = unrolled_forward(head, embed, seq, unroll=3)
    ids = seq["input_ids"].tolist()
    nd = head.config.draft_vocab_size
    for r in (2, 5, 8):
        drafter = Eagle3Drafter(head, embed)
        # target processed x_0..x_r; x_{r+1} is pending
        drafter.sync(ids[: r + 2], seq["features"][: r + 1])
        tree = Tree.root(ids[r + 1])
        tok, val = drafter.root(tree, nd)
        got = dict(zip(tok.tolist(), val.tolist()))
        want = torch.log_softmax(logits[0][r], -1)
        wanted = dict(zip(head.draft_to_target(torch.arange(nd)).tolist(), want.tolist()))
        assert all(abs(got[k] - wanted[k]) < 1e-4 for k in wanted)
        parent = 0
        for s in (1, 2):  # chain of ground-truth tokens x_{r+2}, x_{r+3}
            node = int(tree.add(torch.tensor([ids[r + 1 + s]]), torch.tensor([parent]), torch.tensor([0.0]))[0])
            tok, val = drafter.expand(tree, torch.tensor([node]), nd)
            got = dict(zip(tok.reshape(-1).tolist(), val.reshape(-1).tolist()))
            want = torch.log_softmax(logits[s][r + s], -1)
            wanted = dict(zip(head.draft_to_target(torch.arange(nd)).tolist(), want.tolist()))
            assert all(abs(got[k] - wanted[k]) < 1e-4 for k in wanted), (r, s)
            parent = node
        drafter.end()


def test_sequence_loss_decreases_with_training():
    _, head, embed = _tiny()
    T = 16
    g = torch.Generator().manual_seed(5)
    top = torch.randint(0, 96, (T, 4), generator=g)
    seq = {
        "input_ids": torch.randint(0, 96, (T,), generator=g),
        "features": torch.randn(T, 96, generator=g),
        "top_ids": top,
        "top_logp": torch.log_softmax(torch.randn(T, 4, generator=g), -1),
        "loss_mask": torch.ones(T, dtype=torch.uint8),
    }
    t2d = torch.full((96,), -1, dtype=torch.long)
    d = torch.arange(head.config.draft_vocab_size)
    t2d[head.draft_to_target(d)] = d
    cfg = TrainConfig(unroll=2)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    first = None
    for _ in range(30):
        loss, _, _ = sequence_loss(head, embed, seq, t2d, cfg)
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.7 * first


@pytest.mark.e2e
def test_regenerate_appends_target_greedy_replies_and_resumes(tmp_path):
    from ltd.models import load_model
    from ltd.train.regenerate import regenerate

    torch.set_num_threads(1)
    m = load_model("smollm2-135m")
    data = tmp_path / "convs.jsonl"
    convs = [{"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": "x"}]} for q in ("Say hi.", "Name a color.", "Count to three.")]
    data.write_text("\n".join(json.dumps(c) for c in convs) + "\n")
    out = tmp_path / "regen.jsonl"
    assert regenerate(m.model, m.tokenizer, str(data), out, max_prompts=2, max_new_tokens=6, batch_size=2) == 2
    assert regenerate(m.model, m.tokenizer, str(data), out, max_prompts=3, max_new_tokens=6, batch_size=2) == 3
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["conversations"][0]["value"] for r in rows] == ["Say hi.", "Name a color.", "Count to three."]
    # the reply is the target's own greedy continuation (batch-1 reference for the first prompt)
    ids = m.tokenizer.apply_chat_template([{"role": "user", "content": "Say hi."}], add_generation_prompt=True, tokenize=True, return_dict=False)
    ref = m.model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, temperature=None, top_p=None, top_k=None)
    assert rows[0]["conversations"][1]["value"] == m.tokenizer.decode(ref[0, len(ids):], skip_special_tokens=True).strip()


def test_shrink_draft_vocab_keeps_the_kept_tokens_logits(tmp_path):
    """A head cut to a subset of its draft vocabulary scores those tokens exactly as before."""
    from ltd.drafting.eagle3 import load_head, save_head, shrink_draft_vocab
    from ltd.errors import LtdError

    _, head, _ = _tiny()
    ids = head.draft_to_target(torch.arange(40))
    keep = ids[torch.tensor([0, 3, 4, 10, 39])]
    small = shrink_draft_vocab(head, keep)
    assert small.config.draft_vocab_size == 5
    assert small.draft_to_target(torch.arange(5)).tolist() == sorted(keep.tolist())
    assert small.t2d.sum() == 5 and bool(small.t2d[keep].all())
    hidden = torch.randn(3, 32)
    rows = torch.tensor([0, 3, 4, 10, 39])
    assert torch.equal(small.lm_head.weight, head.lm_head.weight[rows])
    assert torch.allclose(small.logits(hidden), head.logits(hidden)[:, rows], atol=1e-5, rtol=0)  # BLAS blocking differs
    for name, p in head.state_dict().items():  # everything but the output layer is unchanged
        if name not in ("lm_head.weight", "d2t", "t2d"):
            assert torch.equal(small.state_dict()[name], p)
    save_head(small, tmp_path / "small", dtype=torch.float32)
    assert torch.equal(load_head(tmp_path / "small").lm_head.weight, small.lm_head.weight)
    missing = [t for t in range(96) if t not in ids.tolist()][:1]
    with pytest.raises(LtdError, match="lacks"):
        shrink_draft_vocab(head, torch.tensor(missing))
