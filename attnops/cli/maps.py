"""``python -m attnops.maps``: run a small model on a text and write its block attention maps as PNGs.

The model is built from a config with random weights (nothing is downloaded): by default a small
causal LM of ``attnops.nn.Attention`` blocks (``--layers/--heads/--kv-heads/--dim``), or a transformers
model from a config JSON (``--hf-config``) run with ``attn_implementation="attnops"``: an encoder config
(BERT, RoBERTa, ModernBERT, ...: a masked-LM model type that is not a decoder) loads the encoder with its
masked-LM head and draws bidirectional maps; any other config loads a causal LM and draws causal maps.
``--weights`` loads a state_dict into either. Text becomes byte tokens (modulo the vocabulary).

Writes into ``--out``: ``grid.png`` (layers x heads), ``layer_<i>.png`` (heads averaged),
``rollout.png`` (block-level attention rollout) and ``maps.pt`` (the maps, by module name).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import List, Optional

import torch
from torch import nn

from attnops.maps.capture import capture
from attnops.core.masks import BlockMask
from attnops.maps.plot import plot_grid, to_heatmap
from attnops.maps.rollout import rollout
from attnops.nn.attention import Attention
from attnops.nn.specs import BlockSparseSpec, SoftmaxSpec

DEFAULT_TEXT = ("Attention maps show where a model looks. Block maps keep that picture for long inputs "
                "without an N x N matrix: one number per pair of blocks. ")


class TinyCausalLM(nn.Module):
    """Byte-level pre-norm transformer: embedding, ``layers`` x (attention + MLP), tied head."""

    def __init__(self, layers: int, dim: int, heads: int, kv_heads: int, attention, vocab: int = 256):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList()
        for _ in range(layers):
            self.blocks.append(nn.ModuleDict({
                "norm1": nn.RMSNorm(dim), "attn": Attention(dim, heads, kv_heads, attention=attention, rope=10000.0),
                "norm2": nn.RMSNorm(dim),
                "mlp": nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)),
            }))
        self.norm = nn.RMSNorm(dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = x + block["attn"](block["norm1"](x))
            x = x + block["mlp"](block["norm2"](x))
        return self.norm(x) @ self.embed.weight.T


def _spec(name: str):
    if name == "causal":
        return SoftmaxSpec(causal=True)
    if name == "full":  # no causality of its own: a transformers model's own is_causal decides
        return SoftmaxSpec(causal=False)
    if name.startswith("window:"):
        return SoftmaxSpec(causal=True, window=(int(name.split(":", 1)[1]), 0))
    if name.startswith("sink_local:"):
        sink, local = (int(x) for x in name.split(":", 1)[1].split(","))
        return BlockSparseSpec(pattern=lambda sq, sk: BlockMask.sink_local((sq, sk), sink, local, block_size=64))
    raise argparse.ArgumentTypeError(f"unknown attention {name!r}: causal, full, window:LEFT, sink_local:SINK,LOCAL")


def _tokens(text: str, seq_len: int, vocab: int) -> torch.Tensor:
    data = list(text.encode("utf-8")) or [0]
    reps = -(-seq_len // len(data))
    return torch.tensor((data * reps)[:seq_len], dtype=torch.long).remainder(vocab).unsqueeze(0)


def is_encoder(config) -> bool:
    """A masked-LM model type that is not configured as a decoder (BERT, RoBERTa, ModernBERT, ...)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    return config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False)


def _hf_model(config_path: Path, spec):
    """``(model, vocab size, encoder?)`` from a config JSON: encoders with their masked-LM head (bidirectional
    attention), everything else as a causal LM."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM

    from attnops.integrations.transformers import register

    name = register("attnops", spec)
    config = AutoConfig.for_model(**json.loads(config_path.read_text()))
    encoder = is_encoder(config)
    cls = AutoModelForMaskedLM if encoder else AutoModelForCausalLM
    return cls.from_config(config, attn_implementation=name), config.vocab_size, encoder


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults after every flag's help; the epilog's paragraphs as written."""


def build_parser() -> argparse.ArgumentParser:
    intro, *details = __doc__.split("\n\n")
    p = argparse.ArgumentParser(prog="python -m attnops.maps", description=intro.split(": ", 1)[1],
                                epilog="\n\n".join(details).replace("``", ""),
                                formatter_class=_HelpFormatter)
    p.add_argument("--text", default=DEFAULT_TEXT, help="input text (repeated or cut to --seq-len bytes)")
    p.add_argument("--text-file", type=Path, default=None, help="read the text from this file instead of --text")
    p.add_argument("--seq-len", type=int, default=512, help="tokens in the input (byte tokens)")
    p.add_argument("--layers", type=int, default=2, help="transformer blocks of the built-in model")
    p.add_argument("--dim", type=int, default=128, help="model width of the built-in model")
    p.add_argument("--heads", type=int, default=4, help="query heads of the built-in model")
    p.add_argument("--kv-heads", type=int, default=None, help="key/value heads of the built-in model (None: --heads)")
    p.add_argument("--attention", type=_spec, default=None,
                   help="the attention: causal, full, window:LEFT (causal sliding window), sink_local:SINK,LOCAL "
                        "(block-sparse); None: causal for the built-in model, the model's own for --hf-config")
    p.add_argument("--hf-config", type=Path, default=None,
                   help="a transformers config JSON (with model_type) instead of the built-in model; encoder "
                        "configs load the encoder (bidirectional maps)")
    p.add_argument("--weights", type=Path, default=None, help="a state_dict (.pt) to load into the model")
    p.add_argument("--block-size", type=int, default=None, help="map block size (None: the kernel block, 64)")
    p.add_argument("--reduce", choices=("mean", "max"), default="mean",
                   help="mean: the block's attention mass per query; max: the largest single probability")
    p.add_argument("--log-scale", action="store_true", help="colour log10 of the probability mass")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/maps"), help="output folder")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    torch.manual_seed(args.seed)
    if args.hf_config is not None:
        model, vocab, encoder = _hf_model(args.hf_config, args.attention or SoftmaxSpec(causal=False))
    else:
        attention = args.attention or SoftmaxSpec(causal=True)
        model, vocab, encoder = TinyCausalLM(args.layers, args.dim, args.heads, args.kv_heads, attention), 256, False
    if args.weights is not None:
        model.load_state_dict(torch.load(args.weights, map_location="cpu"))
    text = args.text_file.read_text() if args.text_file else args.text
    tokens = _tokens(text, args.seq_len, vocab)
    model.eval()
    with torch.no_grad(), capture(model, map_block_size=args.block_size, reduce=args.reduce) as cap:
        model(tokens)
    if not cap.maps:
        raise SystemExit("no attnops attention ran: is the model's attention attnops?")
    args.out.mkdir(parents=True, exist_ok=True)
    written = [plot_grid(cap.maps, args.out / "grid.png", log_scale=args.log_scale)]
    for i, (name, block_map) in enumerate(cap.maps.items()):
        written.append(to_heatmap(block_map, args.out / f"layer_{i}.png", title=f"{name} (heads averaged)",
                                  log_scale=args.log_scale))
    written.append(to_heatmap(rollout(cap.maps), args.out / "rollout.png", title="attention rollout",
                              log_scale=args.log_scale))
    torch.save({name: m.cpu() for name, m in cap.maps.items()}, args.out / "maps.pt")
    written.append(args.out / "maps.pt")
    first = next(iter(cap.maps.values()))
    kind = "bidirectional (encoder)" if encoder else "causal"
    print(f"{len(cap.maps)} layers, {kind} block maps {tuple(first.shape)} from {tokens.shape[1]} tokens:")
    for path in written:
        print(f"  {path}")
    return 0
