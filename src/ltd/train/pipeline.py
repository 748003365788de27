"""``ltd train-drafter``: features (cached) -> draft vocabulary -> head training -> final head."""

from __future__ import annotations

import logging
import time
from pathlib import Path


from ltd.drafting.eagle3 import Eagle3Config, Eagle3Head
from ltd.errors import LtdError
from ltd.models import load_model
from ltd.train.features import compute_features, load_shards
from ltd.train.trainer import TrainConfig, train_head

log = logging.getLogger(__name__)


def train_drafter(
    target: str,
    data: str,
    out_dir: Path,
    max_tokens: int,
    cfg: TrainConfig,
    resume: bool = False,
    device: str = "cpu",
    feature_dir: Path | None = None,
    init_from: Path | None = None,
) -> Eagle3Head:
    """Train an EAGLE-3 head for ``target``; returns the trained head (also saved to out_dir/head)."""
    t0 = time.perf_counter()
    model = load_model(target, device=device)
    n_layers = int(model.model.config.num_hidden_layers)
    layer_ids = Eagle3Config.default_layer_ids(n_layers)
    feature_dir = feature_dir or (out_dir / "features")
    man = compute_features(
        model.model, model.tokenizer, target, data, feature_dir, layer_ids, max_tokens=max_tokens, max_len=cfg.max_seq_len
    )
    t_feat = time.perf_counter() - t0
    if len(man.shards) < 2:
        raise LtdError("need at least two feature shards (one is held out for evaluation); raise --max-tokens")
    target_config = model.model.config
    embed = model.model.get_input_embeddings().weight.detach().cpu().clone()
    del model  # free the target: training needs only its embeddings
    shards = load_shards(feature_dir, man.shards[:-1])
    eval_shards = load_shards(feature_dir, man.shards[-1:])
    head = train_head(shards, eval_shards, target_config, embed, man.layer_ids, out_dir, cfg, resume=resume, init_from=init_from)
    log.info("features %.0f s, total %.0f s", t_feat, time.perf_counter() - t0)
    return head
