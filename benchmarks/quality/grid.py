"""Accuracy-per-parameter grid: task x method x seed, each run through `ttpeft train`.

Every finished run appends one JSON line to the results file; a run whose key (task, method variant,
config, seed) is already there is skipped, so the grid completes over several sittings.

With --lr-grid, each method's learning rate is first chosen on a slice held out from the TRAIN split
(the reported validation split is never used for the choice); the chosen value is recorded in the row.
--lr-extend N keeps walking past the grid's edge while the edge rate is strictly the best (up to N more
rates); --reuse-from takes the held-out scores an earlier --lr-grid recorded instead of rerunning them;
--lr-from trains further seeds at the rate an earlier --lr-grid chose; --lr-off-cliff steps down from a best
rate whose neighbour above never trained.

    python benchmarks/quality/grid.py --dry-run
    python benchmarks/quality/grid.py --tasks sst2 --methods lora_r8,ttlora --seeds 0 \
        --max-train-samples 500 --max-eval-samples 200 --epochs 1
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent

TASKS = {"sst2": "glue", "rte": "glue", "stsb": "glue", "cb": "super_glue", "boolq": "super_glue"}
# Full train-split sizes, used for the time estimate when the parquet files are not at hand.
TRAIN_SIZES = {"sst2": 67349, "rte": 2490, "stsb": 5749, "cb": 250, "boolq": 9427}

# The LoRETTA methods at the 10x budget (below): the budget, and the layer norms frozen.
LORETTA_10X = ["--param-budget", "7000", "--train-layernorms", "false"]
ADP_10X_NORM = [*LORETTA_10X, "--normalize-input", "true"]
FFN_DENSE = r".*layer\.\d+\.(intermediate|output)\.dense"  # not attention.output.dense
FFN_NORM_PATTERN = r".*layer\.\d+\.output\.LayerNorm"  # the feed-forward output norms (not attention's)
# The same six norms of MiniLM by name, for --modules-to-save (peft matches its entries by name suffix, not pattern).
FFN_NORMS = ",".join(f"layer.{i}.output.LayerNorm" for i in range(6))
# LoRETTA_rep's trains on the feed-forward block with its six output norms.
FFN_WITH_NORMS = ["--target-modules", FFN_DENSE, "--layernorm-modules", FFN_NORM_PATTERN]
QV_FFN_DENSE = r".*layer\.\d+\.(attention\.self\.(query|value)|intermediate\.dense|output\.dense)"
# LoRETTA_adp's rank-1-2 adapters beside the twelve feed-forward linears, with those six norms, no biases.
ADP_FFN_LN_PAR = ["--param-budget", "2688", "--adapter-bias", "false", *FFN_WITH_NORMS,
                  "--parallel-adapter-modules", "intermediate.dense,output.dense"]

# Method variant -> (ttpeft method, extra `ttpeft train` arguments). The variant name is the grid's label.
METHODS = {
    "head": ("head", []),
    "full": ("full", []),
    "lora_r8": ("lora", ["--r", "8", "--lora-alpha", "8", "--target-modules", "query,value"]),
    "lora_r1": ("lora", ["--r", "1", "--lora-alpha", "1", "--target-modules", "query,value"]),
    "ttlora": ("ttlora", []),
    "loretta_rep": ("loretta_rep", []),
    "loretta_adp": ("loretta_adp", []),
    # ~10x fewer adapter parameters than lora_r8 (73,728 on MiniLM): a 7,000-parameter budget, and for the
    # LoRETTA methods no trained layer norms (MiniLM's 9,984 alone would break the ratio). Fewer, larger cores
    # train faster in a short run (README): TT-LoRA splits each side in 2 factors (4 cores at rank 3 instead of
    # 6 at rank 4-5), LoRETTA_rep stores A and B as 2 cores each (instead of 4 at rank 1-2).
    "ttlora_10x": ("ttlora", ["--param-budget", "7000", "--factors-per-side", "2"]),
    "loretta_rep_10x": ("loretta_rep", [*LORETTA_10X, "--tensor-cores", "2"]),
    "loretta_adp_10x": ("loretta_adp", LORETTA_10X),
    # LoRETTA_rep as published trains every layer norm (9,984 parameters on MiniLM, over the 10x budget); this
    # one trains the six feed-forward output norms (4,608) and rank-1 trains (2,688): 7,296 in all, 10.1x.
    "loretta_rep_10x_ln": ("loretta_rep", ["--param-budget", "2688", "--tensor-cores", "2",
                                           "--layernorm-modules", FFN_NORM_PATTERN]),
    # TT-LoRA with the same six norms (its paper trains none; peft's modules_to_save): rank-2 trains, 2,688.
    "ttlora_10x_ln": ("ttlora", ["--param-budget", "2688", "--factors-per-side", "2", "--modules-to-save", FFN_NORMS]),
    # Two adapters per block spend 5,376 of those 7,000 on biases (64 + 384 each), leaving rank-1/2 trains; one
    # adapter per block, after the feed-forward output (Pfeiffer et al.'s placement), gets rank 4.
    "loretta_adp_10x_ffn": ("loretta_adp", [*LORETTA_10X, "--target-modules", r".*layer\.\d+\.output\.dense"]),
    # The same, RMS-normalising each adapter's input: the dense outputs the adapters sit on differ 40-230x
    # in size (MiniLM, layers 0-2), and at 2e-2 two adapters take the residual stream over (README).
    "loretta_adp_10x_norm": ("loretta_adp", ADP_10X_NORM),
    # The same with 4 cores a train instead of 5 (`16,16,12,8`): a rank-1 train is a Kronecker product of
    # its cores, and under Adam a product of more cores grows faster for one rate.
    "loretta_adp_10x_norm_c4": ("loretta_adp", [*ADP_10X_NORM, "--tensor-cores", "4"]),
    # The same with a longer lr warm-up (20% of the steps instead of the grid's 6%): the takeover happens in the
    # first steps at full rate.
    "loretta_adp_10x_norm_wu": ("loretta_adp", [*ADP_10X_NORM, "--warmup-fraction", "0.2"]),
    # The same with a bottleneck of 16 instead of 64: 12 x 48 fewer down-projection biases, so the trains get
    # rank 2 (`8,8,6,16`), 6,900 parameters.
    "loretta_adp_10x_norm_b16": ("loretta_adp", [*ADP_10X_NORM, "--bottleneck-size", "16"]),
    # One adapter a block on the feed-forward block's input (the attention block's layer-normed output, one
    # scale in every layer) instead of on two dense outputs whose sizes differ 40-230x: tensor rank 4.
    "loretta_adp_10x_ffn_in": ("loretta_adp", [*LORETTA_10X, "--target-modules", "intermediate.dense",
                                               "--input-adapter-modules", "intermediate.dense"]),
    # loretta_adp_10x_norm with the six feed-forward output norms (4,608), as loretta_rep_10x_ln: the
    # projection biases (5,376) give way to them; the trains get 2,552 (rank 1-2): 7,160 in all, 10.3x. Stopped
    # after seed 0 (STS-B never started, SST-2 70.8: held-out-probes/adapter-bias.txt).
    "loretta_adp_10x_ln": ("loretta_adp", ["--param-budget", "2688", "--normalize-input", "true",
                                           "--adapter-bias", "false",
                                           "--layernorm-modules", FFN_NORM_PATTERN]),
    # loretta_adp_10x_norm started as the published code starts it (`--init reference`): both trains random and
    # the biases at nn.Linear's init, so the adapter's output is not zero at step 0.
    "loretta_adp_10x_norm_ref": ("loretta_adp", [*ADP_10X_NORM, "--init", "reference"]),
    # loretta_adp_10x_norm with another bottleneck activation than the published ReLU (which zeroes about half of
    # a zero-mean bottleneck): GELU, MiniLM's own; and none, which leaves a residual low-rank map plus biases.
    "loretta_adp_10x_norm_gelu": ("loretta_adp", [*ADP_10X_NORM, "--non-linearity", "gelu"]),
    "loretta_adp_10x_norm_linear": ("loretta_adp", [*ADP_10X_NORM, "--non-linearity", "linear"]),
    # loretta_adp_10x_norm with weight-normalised projections: up's output grows with one gain (from 0), not
    # with a product of five cores, which under Adam outgrew the sublayer outputs in the first steps (README).
    "loretta_adp_10x_norm_wn": ("loretta_adp", [*ADP_10X_NORM, "--weight-norm", "true"]),
    # loretta_adp_10x_ln (biases traded for the six feed-forward output norms) with those weight-normalised
    # projections: loretta_adp_10x_ln's STS-B run never started at its chosen rate, as loretta_adp_10x_norm's had.
    "loretta_adp_10x_ln_wn": ("loretta_adp", ["--param-budget", "2688", "--normalize-input", "true",
                                              "--adapter-bias", "false", "--weight-norm", "true",
                                              "--layernorm-modules", FFN_NORM_PATTERN]),
    # The same adapters beside their layers (He et al.'s parallel adapter: from the layer's input to its output)
    # instead of after them; and beside the twelve feed-forward linears, where TT-LoRA and LoRETTA_rep do best.
    "loretta_adp_10x_ln_wn_par": ("loretta_adp", ["--param-budget", "2688", "--normalize-input", "true",
                                                  "--adapter-bias", "false", "--weight-norm", "true",
                                                  "--layernorm-modules", FFN_NORM_PATTERN,
                                                  "--parallel-adapter-modules", "output.dense"]),
    # The parallel adapters without weight norm or input scaling: up's last core starts at zero, as LoRETTA_rep's B.
    "loretta_adp_10x_ffn_ln_par": ("loretta_adp", ADP_FFN_LN_PAR),
    # loretta_adp_10x_ffn_ln_par with the norms at a rate of their own (the grid's --lr then sets the adapters'):
    # its adapters learn at 5e-3-1e-2, where loretta_adp_10x_ln_wn's norms did best at 1e-2-2e-2; and with GELU.
    "loretta_adp_10x_ffn_ln_par_lnlr_1e2": ("loretta_adp", [*ADP_FFN_LN_PAR, "--layer-norm-lr", "1e-2"]),
    "loretta_adp_10x_ffn_ln_par_lnlr_2e2": ("loretta_adp", [*ADP_FFN_LN_PAR, "--layer-norm-lr", "2e-2"]),
    "loretta_adp_10x_ffn_ln_par_gelu": ("loretta_adp", [*ADP_FFN_LN_PAR, "--non-linearity", "gelu"]),
    "loretta_adp_10x_ffn_ln_wn_par": ("loretta_adp", ["--param-budget", "2688", "--normalize-input", "true",
                                                      "--adapter-bias", "false", "--weight-norm", "true",
                                                      *FFN_WITH_NORMS, "--parallel-adapter-modules",
                                                      "intermediate.dense,output.dense"]),
    # loretta_adp_10x without the projection biases (5,376 of the 7,000): the trains get them, rank 3-4 (6,924).
    "loretta_adp_10x_nobias": ("loretta_adp", [*LORETTA_10X, "--adapter-bias", "false"]),
    # loretta_adp_10x with its adapters on the outputs of the attention and feed-forward LayerNorms (one scale in
    # every layer) instead of the dense layers (sizes 40-230x apart). Needs probes/adp_after_norm on PYTHONPATH
    # with TTPEFT_PROBE_ADP_AFTER_NORM=1 (LoRETTA_adp adapts no LayerNorm otherwise, and says so).
    "loretta_adp_10x_after_norm": ("loretta_adp", [*LORETTA_10X, "--target-modules",
                                                   r".*layer\.\d+\.(attention\.)?output\.LayerNorm"]),
    # Ablations of TT-LoRA at the 10x budget (run only when named in --methods): a wide middle bond (the
    # rank of dW) between thin outer ones, `48,8 | 8,48` at ranks 2,7,2, 4,992 parameters; the same budget
    # spread over all four attention projections (rank 2).
    "ttlora_10x_mid": ("ttlora", ["--factors-per-side", "2", "--tt-rank", "2,7,2"]),
    "ttlora_10x_qkvo": ("ttlora", ["--param-budget", "7000", "--factors-per-side", "2",
                                   "--target-modules", "query,key,value,attention.output.dense"]),
    # The budget on the feed-forward block instead of query and value (on query and value TT-LoRA fits more slowly
    # than IA3 and LoKr): a tensor train makes the 384 x 1536 matrices cost little more than the 384 x 384 ones,
    # rank 2-3 (6,840 parameters); and on query, value and the feed-forward block at rank 2-3 (6,928).
    "ttlora_10x_ffn": ("ttlora", ["--param-budget", "7000", "--factors-per-side", "2",
                                  "--target-modules", FFN_DENSE]),
    "ttlora_10x_qv_ffn": ("ttlora", ["--param-budget", "7000", "--factors-per-side", "2",
                                     "--target-modules", QV_FFN_DENSE]),
    # TT-LoRA on the feed-forward block with the six norms of ttlora_10x_ln (4,608): the norms lifted TT-LoRA's STS-B
    # on query and value, and the block is where its budget fits fastest. Uniform rank 2 needs 3 factors a side
    # (`8,8,6 | 8,12,16`, 2,208: 6,816 in all, 10.8x); with 2 a side it is rank 1 (1,440: 6,048, 12.2x).
    "ttlora_10x_ffn_ln": ("ttlora", ["--tt-rank", "2", "--factors-per-side", "3", "--target-modules", FFN_DENSE,
                                     "--modules-to-save", FFN_NORMS]),
    "ttlora_10x_ffn_ln_r1": ("ttlora", ["--tt-rank", "1", "--factors-per-side", "2", "--target-modules", FFN_DENSE,
                                        "--modules-to-save", FFN_NORMS]),
    # LoRETTA_rep's budget on the feed-forward block (its default cores: with 2 a side the 1536-wide trains drop
    # to rank 1): rank 3, 6,792 parameters.
    "loretta_rep_10x_ffn": ("loretta_rep", [*LORETTA_10X, "--target-modules", FFN_DENSE]),
    # LoRETTA_rep as ttlora_10x_ffn_ln_r1 spends the budget: the feed-forward block and its six output norms
    # (4,608); rank-2 trains (2,448): 7,056 in all, 10.4x.
    "loretta_rep_10x_ffn_ln": ("loretta_rep", ["--tensor-rank", "2", *FFN_WITH_NORMS]),
    # The same with the factors' scale lora_alpha / r at 0.5 instead of 2: on held-out STS-B (seed 0) the
    # default's run at 2e-2 never trains, this one's does.
    "loretta_rep_10x_ffn_ln_a4": ("loretta_rep", ["--tensor-rank", "2", "--lora-alpha", "4", *FFN_WITH_NORMS]),
    # The same cores in a balanced gauge: every random core gets one entry scale (the geometric mean of the
    # default's), so ΔW's statistics are unchanged but Adam, which is not gauge-invariant, moves each core
    # at the same relative rate.
    "ttlora_10x_bal": ("ttlora", ["--param-budget", "7000", "--factors-per-side", "2", "--init", "balanced"]),
    # Ablation of the LoRETTA defaults: the layer norms stay frozen. On SmolLM2 they train at the adapters'
    # rate by default, which a short run does not survive (README).
    "loretta_rep_noln": ("loretta_rep", ["--train-layernorms", "false"]),
    "loretta_adp_noln": ("loretta_adp", ["--train-layernorms", "false"]),
    # ... or train at their own, lower rate (LLaMA-family RMSNorm weights are small: README).
    "loretta_rep_lnlr": ("loretta_rep", ["--layer-norm-lr", "1e-4"]),
    "vera": ("vera", []),
    "fourierft": ("fourierft", []),
    "vblora": ("vblora", []),
    # The same ~7,000-parameter budget for the baselines whose default size is larger (MiniLM, query/value):
    # 12 layers x 576 coefficients; a bank of 16 vectors of 128 plus 12 x 384 logits.
    "fourierft_10x": ("fourierft", ["--n-frequency", "576"]),
    "vblora_10x": ("vblora", ["--num-vectors", "16", "--vector-length", "128"]),
    "tinylora": ("tinylora", []),
    "lokr": ("lokr", []),
    # ~100x fewer adapter parameters than lora_r8: a budget of 737 (lora_r8 / 100), the top of the 10-100x range;
    # the rivals' sizes reach 768, TinyLoRA's fixed default. The tensor trains are rank 1; LoRETTA_adp cannot go
    # this low (its biases alone are 5,376) and neither can IA3 or LN tuning short of dropping layers.
    "ttlora_100x": ("ttlora", ["--param-budget", "737"]),
    "loretta_rep_100x": ("loretta_rep", ["--param-budget", "737", "--train-layernorms", "false"]),
    "fourierft_100x": ("fourierft", ["--n-frequency", "61"]),
    "vblora_100x": ("vblora", ["--r", "1", "--num-vectors", "4", "--vector-length", "96"]),
    "ia3": ("ia3", []),
    # IA3 at the same budget: scale the outputs of key, value and the attention output (6 layers x 3 x 384).
    "ia3_10x": ("ia3", ["--target-modules", "key,value,attention.output.dense"]),
    "ln_tuning": ("ln_tuning", []),  # every layer norm: 9,984 parameters on MiniLM
    # LN tuning at loretta_rep_10x_ln's norms: the six feed-forward output norms (4,608).
    "ln_tuning_10x": ("ln_tuning", ["--target-modules", FFN_NORM_PATTERN]),
    "zero_shot": ("zero_shot", []),  # causal LMs: the prompt with no training (`ttpeft eval --model`)
}
ABLATIONS = ("loretta_adp_10x_ffn", "loretta_adp_10x_norm", "loretta_adp_10x_norm_c4", "loretta_adp_10x_norm_wu",
             "loretta_adp_10x_norm_b16", "loretta_adp_10x_ffn_in", "loretta_adp_10x_ln", "loretta_adp_10x_after_norm",
             "loretta_adp_10x_nobias", "loretta_adp_10x_norm_ref", "loretta_adp_10x_norm_gelu",
             "loretta_adp_10x_norm_linear", "loretta_adp_10x_norm_wn", "ttlora_10x_ffn_ln", "ttlora_10x_ffn_ln_r1",
             "ttlora_10x_mid", "ttlora_10x_qkvo", "ttlora_10x_bal", "ttlora_10x_ffn", "ttlora_10x_qv_ffn",
             "loretta_rep_10x_ffn", "loretta_rep_10x_ffn_ln", "loretta_rep_10x_ffn_ln_a4", "loretta_rep_noln",
             "loretta_adp_noln", "loretta_rep_lnlr", "loretta_adp_10x_ln_wn", "loretta_adp_10x_ln_wn_par",
             "loretta_adp_10x_ffn_ln_wn_par", "loretta_adp_10x_ffn_ln_par", "loretta_adp_10x_ffn_ln_par_lnlr_1e2",
             "loretta_adp_10x_ffn_ln_par_lnlr_2e2", "loretta_adp_10x_ffn_ln_par_gelu")
# Variants that run only with a probe loaded (its folder under probes/ on PYTHONPATH, its variable set to 1).
PROBE_VARIANTS = {"loretta_adp_10x_after_norm": ("adp_after_norm", "TTPEFT_PROBE_ADP_AFTER_NORM")}
ENCODER_ONLY = ("head", "full")  # a causal LM scores label words and has no classification head
# the causal-LM grid
CAUSAL_DEFAULT = ["zero_shot", "lora_r8", "ttlora", "loretta_rep", "loretta_adp",
                  "loretta_rep_noln", "loretta_adp_noln"]
# The encoder module names in the variants' arguments, renamed for a causal LM (LLaMA family).
CAUSAL_MODULE_NAMES = {"query,value": "q_proj,v_proj", "query,key,value,attention.output.dense":
                       "q_proj,k_proj,v_proj,o_proj", "key,value,attention.output.dense": "k_proj,v_proj,o_proj",
                       r".*layer\.\d+\.output\.dense": "down_proj", FFN_DENSE: "gate_proj,up_proj,down_proj",
                       QV_FFN_DENSE: "q_proj,v_proj,gate_proj,up_proj,down_proj"}
# Shorthand accepted by --methods: plain "lora" means r=8.
METHOD_ALIASES = {"lora": "lora_r8"}

# Rough CPU seconds per training step (batch 32, MiniLM, 2 cores) and per-run fixed cost (imports,
# model load, evaluation); only for --dry-run when the results file has no rows for the method yet.
# Keyed by ttpeft method; a variant named here has its own rate.
SECONDS_PER_STEP = {"head": 0.35, "full": 1.4, "lora": 0.75, "ttlora": 0.85, "loretta_rep": 0.9,
                    "loretta_adp": 0.9, "ttlora_10x_qkvo": 0.9, "vera": 0.85, "fourierft": 1.0, "vblora": 0.9,
                    "tinylora": 0.85, "lokr": 0.85, "ia3": 0.7, "ln_tuning": 0.6, "zero_shot": 0.0}
SECONDS_PER_RUN = 12.0
CAUSAL_SECONDS_PER_STEP = 7.0  # SmolLM2-135M, batch 8, 2 cores (any adapter; the base model dominates)
CAUSAL_SECONDS_PER_RUN = 240.0  # loading and dequantising the GGUF, scoring every label word

# Learning-rate grid as multiples of the method's own default (--lr-grid).
LR_MULTIPLIERS = (0.5, 1.0, 2.0)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default=None,
                        help="comma-separated tasks (default: all of " + ", ".join(TASKS) + "; no stsb for causal LMs)")
    parser.add_argument("--methods", default=None, help="comma-separated method variants: "
                        + ", ".join(METHODS) + " (lora = lora_r8; default: every variant for the model's family, "
                        "for an encoder but the ablations " + ", ".join(ABLATIONS) + ")")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--data-dir", default=str(REPO_ROOT.parent / "shared" / "data"),
                        help="GLUE/SuperGLUE parquet folder, or 'embedded' (SST-2 only)")
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-train-samples", type=int, default=None)
    parser.add_argument("--max-eval-samples", type=int, default=None)
    parser.add_argument("--lr-grid", action="store_true",
                        help="choose each method's lr on a slice held out from the train split")
    parser.add_argument("--lr-extend", type=int, default=0, metavar="N",
                        help="with --lr-grid: while the best held-out rate is the grid's highest (lowest) and strictly "
                             "better than its neighbour, try the rate twice (half) as large, up to N more rates")
    parser.add_argument("--lr-off-cliff", action="store_true",
                        help="with --lr-grid: when the held-out run at the rate above the best one never trained "
                             "(its training loss did not fall) and the best one did, take the rate below the best instead: the best sits "
                             "at a cliff's edge, which another seed may go over")
    parser.add_argument("--reuse-from", default=None, metavar="RESULTS",
                        help="with --lr-grid: an earlier --lr-grid results file with the same caps; its recorded "
                             "held-out scores stand for those selection runs, and its row is copied when its rate "
                             "is still the choice")
    parser.add_argument("--lr-from", default=None, metavar="RESULTS",
                        help="train at the rate an earlier --lr-grid results file chose on its held-out slice for "
                             "the same task, variant and caps (its lowest seed's choice): more seeds at one lr")
    parser.add_argument("--holdout-samples", type=int, default=200,
                        help="size of the held-out train slice used by --lr-grid and --on-holdout")
    parser.add_argument("--on-holdout", action="store_true",
                        help="train on the train split minus the held-out slice and report on that slice "
                             "(for design choices: the validation split is never seen)")
    parser.add_argument("--lr", type=float, default=None,
                        help="one learning rate for every run (default: each method's own)")
    parser.add_argument("--results", default=str(HERE / "results" / "results.jsonl"))
    parser.add_argument("--runs-dir", default=str(REPO_ROOT / "runs" / "quality"))
    parser.add_argument("--dry-run", action="store_true", help="print the plan and its estimated time")
    return parser.parse_args(argv)


def split_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def use_checkout_sources() -> None:
    """Import this checkout's ttpeft, the one the runs use."""
    if str(REPO_ROOT / "src") not in sys.path:
        sys.path.insert(0, str(REPO_ROOT / "src"))


def is_causal(model: str) -> bool:
    use_checkout_sources()
    from ttpeft.training import CAUSAL_LM, model_family, resolve_model

    return model_family(resolve_model(model)) == CAUSAL_LM


def default_lr(method: str) -> float:
    """The CLI's default learning rate for the method (what a run without --lr uses)."""
    use_checkout_sources()
    from ttpeft.methods import get_method

    return get_method(method).default_lr


def method_args(variant: str, causal: bool) -> tuple[str, list[str]]:
    """(ttpeft method, its `ttpeft train` arguments) for the model family."""
    method, extra = METHODS[variant]
    return method, [CAUSAL_MODULE_NAMES.get(a, a) for a in extra] if causal else list(extra)


def run_config(variant: str, args, lr=None) -> dict:
    """Everything that makes two runs of a variant comparable; part of the resume key."""
    method, extra = method_args(variant, args.causal)
    return {"method": method, "args": extra, "model": args.model, "data_dir": args.data_dir, "epochs": args.epochs,
            "batch_size": args.batch_size, "max_train_samples": args.max_train_samples,
            "max_eval_samples": args.max_eval_samples, "lr_grid": args.lr_grid if lr is None else False,
            **({"lr": lr} if lr is not None else {}),
            # only when set, so the keys of earlier rows stay valid
            **({"fixed_lr": args.lr} if args.lr is not None else {}),
            **({"lr_extend": args.lr_extend} if args.lr_extend and lr is None else {}),
            **({"lr_off_cliff": True} if args.lr_off_cliff and lr is None else {}),
            **({"on_holdout": args.holdout_samples} if args.on_holdout else {})}


def run_key(task: str, variant: str, config: dict, seed: int) -> str:
    return json.dumps([task, variant, config, seed], sort_keys=True)


def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            rows.append(json.loads(line))
    return rows


def train_size(task: str, data_dir: str) -> int:
    path = Path(data_dir) / TASKS[task] / task / "train.parquet"
    try:
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    except Exception:  # no folder ('embedded', 'hub') or no pyarrow: the known size
        return TRAIN_SIZES[task]


def planned_steps(task: str, args) -> int:
    n = train_size(task, args.data_dir)
    if args.max_train_samples:
        n = min(n, args.max_train_samples)
    return math.ceil(math.ceil(n / args.batch_size) * args.epochs)


def seconds_per_step(variant: str, rows: list[dict], args) -> float:
    """Median measured rate from past rows of the variant on this model, else the constant."""
    rates = [r["train_runtime_s"] / r["steps"] for r in rows
             if r.get("variant") == variant and r.get("model") == args.model and r.get("steps")
             and r.get("train_runtime_s")]
    if rates:
        return statistics.median(rates)
    if args.causal:
        return CAUSAL_SECONDS_PER_STEP if variant != "zero_shot" else 0.0
    return SECONDS_PER_STEP.get(variant, SECONDS_PER_STEP[METHODS[variant][0]])


def run_dir_name(task: str, variant: str, key: str, seed: int, tag: str = "") -> str:
    digest = hashlib.sha1(key.encode()).hexdigest()[:8]
    return f"{task}-{variant}-s{seed}{tag}-{digest}"


def train_once(task: str, variant: str, seed: int, args, data_dir: str, output_dir: Path,
               lr=None, max_train_samples=None, max_eval_samples=None) -> dict:
    """One `ttpeft train` run in a subprocess (a crash or leak stays in it); returns its results.json."""
    if variant == "zero_shot":
        return zero_shot_once(task, args, data_dir, max_eval_samples)
    method, extra = method_args(variant, args.causal)
    command = [sys.executable, "-m", "ttpeft", "train", "--model", args.model, "--task", task,
               "--method", method, *extra, "--seed", str(seed), "--epochs", str(args.epochs),
               "--batch-size", str(args.batch_size), "--data-dir", data_dir,
               "--output-dir", str(output_dir), "--overwrite", "--no-progress"]
    if lr is not None:
        command += ["--lr", repr(lr)]
    if max_train_samples:
        command += ["--max-train-samples", str(max_train_samples)]
    if max_eval_samples:
        command += ["--max-eval-samples", str(max_eval_samples)]
    run_ttpeft(command)
    return json.loads((output_dir / "results.json").read_text())


def run_ttpeft(command: list[str]) -> str:
    """Run a ttpeft command from this checkout's sources; its stdout, or a RuntimeError with its output's tail."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT / "src"),
                                                                      os.environ.get("PYTHONPATH")])))
    completed = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    if completed.returncode != 0:
        tail = "\n".join((completed.stdout + completed.stderr).strip().splitlines()[-15:])
        raise RuntimeError(f"{' '.join(command)}\nexit {completed.returncode}\n{tail}")
    return completed.stdout


def zero_shot_once(task: str, args, data_dir: str, max_eval_samples) -> dict:
    """`ttpeft eval --model M --task T`: the causal LM's prompt accuracy with no training, as a results dict."""
    started = time.time()
    command = [sys.executable, "-m", "ttpeft", "eval", "--model", args.model, "--task", task, "--data-dir", data_dir,
               "--no-progress"] + (["--max-eval-samples", str(max_eval_samples)] if max_eval_samples else [])
    lines = run_ttpeft(command).splitlines()
    # "ttpeft eval: <task> (<data>) · zero-shot prompt on <model> · N examples", then "  <metric> <value>" lines
    examples = int(lines[0].rsplit("·", 1)[1].split()[0])
    metrics = {name: float(value) for name, value in
               (line.split() for line in lines[1:] if not line.strip().startswith("wall time"))}
    return {"method": "zero_shot", "model": args.model, "method_config": {}, "trainable_params": 0,
            "total_params": None, "head_params": 0, "adapter_bytes": 0, "metrics": metrics,
            "headline_metric": next(iter(metrics)), "settings": {"lr": None},
            "train": {"steps": 0, "train_runtime_s": 0.0}, "wall_time_s": round(time.time() - started, 1),
            "num_train_examples": 0, "num_eval_examples": examples, "data": data_dir,
            "command": " ".join(["ttpeft"] + command[3:])}


def holdout_data_dir(task: str, seed: int, args) -> str:
    """A data folder whose 'train' is the train split minus a held-out slice and whose 'validation'
    is that slice, so lr selection never sees the reported validation split."""
    import pandas as pd

    folder = Path(args.runs_dir) / "holdout" / f"{task}-s{seed}-n{args.holdout_samples}"
    target = folder / TASKS[task] / task
    if not (target / "validation.parquet").is_file():
        source = Path(args.data_dir) / TASKS[task] / task / "train.parquet"
        frame = pd.read_parquet(source).sample(frac=1.0, random_state=seed).reset_index(drop=True)
        n = min(args.holdout_samples, len(frame) // 5)  # small tasks (CB) keep most of their data
        target.mkdir(parents=True, exist_ok=True)
        frame.iloc[n:].to_parquet(target / "train.parquet", index=False)
        frame.iloc[:n].to_parquet(target / "validation.parquet", index=False)
    return str(folder)


def held_out_rows(task: str, seed: int, args) -> int:
    """Rows in the held-out slice actually used (fewer than --holdout-samples on small tasks)."""
    import pandas as pd

    folder = Path(holdout_data_dir(task, seed, args)) / TASKS[task] / task
    return len(pd.read_parquet(folder / "validation.parquet"))


def choose_lr(task: str, variant: str, seed: int, args,
              recorded: dict | None = None) -> tuple[float, dict, list[float]]:
    """Best held-out rate, the score at each rate tried and the rates whose held-out run never trained (its
    training loss did not fall). ``recorded`` (rate as str -> score) holds scores of selection runs an earlier
    grid made (--reuse-from); those are not run again."""
    method = METHODS[variant][0]
    recorded = recorded or {}
    data_dir = holdout_data_dir(task, seed, args)
    scores, never_trained = {}, []

    def score(lr: float) -> None:
        config = {**run_config(variant, args, lr), "holdout_samples": args.holdout_samples}
        out = Path(args.runs_dir) / "lr" / run_dir_name(task, variant, run_key(task, variant, config, seed), seed,
                                                        f"-lr{lr:g}")
        finished = out / "results.json"  # a selection run of an interrupted grid is not run again
        if str(lr) in recorded:
            scores[lr] = recorded[str(lr)]
            print(f"    lr {lr:g}: held-out {scores[lr]:.4f} (recorded)", flush=True)
            return
        if finished.is_file():
            result = json.loads(finished.read_text())
        else:
            result = train_once(task, variant, seed, args, data_dir, out, lr=lr,
                                max_train_samples=args.max_train_samples)
        scores[lr] = result["metrics"][result["headline_metric"]]
        if result.get("train", {}).get("loss_fell") is False:
            never_trained.append(lr)
        print(f"    lr {lr:g}: held-out {result['headline_metric']} {scores[lr]:.4f}", flush=True)

    for multiplier in LR_MULTIPLIERS:
        score(default_lr(method) * multiplier)
    for _ in range(args.lr_extend):
        beyond = rate_beyond_edge(scores)
        if beyond is None:
            break
        score(beyond)
    best = max(sorted(scores), key=scores.get)  # ties go to the lower rate
    return best, {str(k): v for k, v in sorted(scores.items())}, sorted(never_trained)


def rate_below_cliff(best: float, rates, never_trained) -> float:
    """The rate below ``best`` when the rate above it never trained (and there is one below), else ``best``.
    Only a best rate that trained sits at a cliff: where it did not either (RTE's held-out loss stays flat at
    every rate), the failures say nothing about where the cliff is."""
    rates = sorted(rates)
    i = rates.index(best)
    if best not in never_trained and i + 1 < len(rates) and rates[i + 1] in never_trained and i > 0:
        return rates[i - 1]
    return best


def rates_chosen_in(path: Path, variants: list[str], args) -> dict:
    """(task, variant) -> {"lr", "seed"}: the rate an --lr-grid results file chose for the variant run with the
    same caps, from its lowest seed."""
    if not path.is_file():
        sys.exit(f"--lr-from {path}: no such results file")
    plain = {v: {k: x for k, x in run_config(v, args).items() if k != "lr_grid"} for v in variants}
    chosen = {}
    for row in sorted(read_rows(path), key=lambda r: -r["seed"]):  # the lowest seed is written last
        config = {k: x for k, x in plain_grid_config(row["config"]).items() if k != "lr_grid"}
        if row.get("lr_selection") and config == plain.get(row["variant"]):
            chosen[(row["task"], row["variant"])] = {"lr": row["lr"], "seed": row["seed"]}
    return chosen


def planned_runs(variant: str, earlier_row: dict | None, args) -> int:
    """Trainings a cell is expected to need: a recorded selection (--reuse-from) costs none unless its best
    rate is at an edge that --lr-extend walks past (one more held-out run and a validation run, at least)."""
    if not args.lr_grid or variant == "zero_shot":
        return 1
    if earlier_row is None:
        return len(LR_MULTIPLIERS) + 1
    scores = {float(lr): score for lr, score in earlier_row["lr_selection"]["held_out_scores"].items()}
    return 2 if args.lr_extend and rate_beyond_edge(scores) is not None else 0


def plain_grid_config(config: dict) -> dict:
    """The config of the same cell however its rate was searched (--lr-extend, --lr-off-cliff): the rows
    --reuse-from can stand in for, and whose chosen rate --lr-from trains further seeds at."""
    return {k: v for k, v in config.items() if k not in ("lr_extend", "lr_off_cliff")}


def rate_beyond_edge(scores: dict) -> float | None:
    """Twice the highest rate (half the lowest) when that rate is strictly the best held-out score, else None."""
    rates = sorted(scores)
    best = max(rates, key=scores.get)
    if any(scores[lr] >= scores[best] for lr in rates if lr != best):
        return None
    return best * 2 if best == rates[-1] else best / 2 if best == rates[0] else None


def row_from_results(task, variant, config, seed, results, lr_choice=None) -> dict:
    train = results["train"]
    return {
        "task": task, "variant": variant, "method": results["method"], "model": results["model"],
        "config": config, "method_config": results["method_config"], "seed": seed,
        "trainable_params": results["trainable_params"], "total_params": results["total_params"],
        "head_params": results.get("head_params"),
        "adapter_bytes": results["adapter_bytes"], "metrics": results["metrics"],
        "headline_metric": results["headline_metric"], "lr": results["settings"]["lr"],
        "lr_selection": lr_choice, "steps": train["steps"], "train_runtime_s": train["train_runtime_s"],
        "loss_fell": train.get("loss_fell"), "train_loss": train.get("train_loss"),
        "wall_time_s": results["wall_time_s"],
        "num_train_examples": results["num_train_examples"],
        "num_eval_examples": results["num_eval_examples"], "data": results["data"],
        "command": results["command"], "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    args.causal = is_causal(args.model)
    # a causal LM scores label words after a prompt: no regression task
    tasks = split_list(args.tasks) if args.tasks else [t for t in TASKS if not (args.causal and t == "stsb")]
    default = CAUSAL_DEFAULT if args.causal else [v for v in METHODS if v != "zero_shot" and v not in ABLATIONS]
    variants = [METHOD_ALIASES.get(v, v) for v in split_list(args.methods)] if args.methods else default
    seeds = [int(s) for s in split_list(args.seeds)]
    unknown = [t for t in tasks if t not in TASKS] + [v for v in variants if v not in METHODS]
    if unknown:
        sys.exit(f"unknown task or method: {', '.join(unknown)}")
    wrong_family = [v for v in variants if v in (ENCODER_ONLY if args.causal else ("zero_shot",))]
    if wrong_family:
        why = "they train a classification head" if args.causal else "it needs a causal LM"
        sys.exit(f"{', '.join(wrong_family)}: not for {args.model} ({why})")
    if (args.lr_grid or args.on_holdout) and args.data_dir in ("embedded", "hub"):
        flag = "--lr-grid" if args.lr_grid else "--on-holdout"
        sys.exit(f"{flag} needs a parquet --data-dir to cut the held-out train slice from")
    if args.lr_extend and not args.lr_grid:
        sys.exit(f"--lr-extend {args.lr_extend} widens the --lr-grid search: add --lr-grid")
    if args.lr_off_cliff and (not args.lr_grid or args.reuse_from):
        sys.exit("--lr-off-cliff acts on the --lr-grid search's own held-out runs: add --lr-grid, without "
                 "--reuse-from (recorded scores do not say whether a run trained)")
    if args.lr_extend < 0:
        sys.exit(f"--lr-extend {args.lr_extend} is invalid: give a number of extra rates >= 0")
    if args.lr_grid and (args.lr is not None or args.on_holdout):
        sys.exit("--lr-grid chooses the lr on the held-out slice itself: not with --lr or --on-holdout")

    if args.lr_from and (args.lr_grid or args.lr is not None or args.on_holdout):
        sys.exit("--lr-from takes each rate from an earlier grid: not with --lr-grid, --lr or --on-holdout")
    chosen_rates = rates_chosen_in(Path(args.lr_from), variants, args) if args.lr_from else {}
    if args.reuse_from and not args.lr_grid:
        sys.exit("--reuse-from reads the held-out scores of an earlier --lr-grid: add --lr-grid")
    earlier = {}
    if args.reuse_from:  # deterministic runs (fixed seed, CPU): a recorded score is the score a rerun gets
        if Path(args.reuse_from).resolve() == Path(args.results).resolve():
            sys.exit(f"--reuse-from {args.reuse_from} is the results file itself: give an earlier grid's file")
        for row in read_rows(Path(args.reuse_from)):
            if row.get("lr_selection"):
                earlier[run_key(row["task"], row["variant"], plain_grid_config(row["config"]), row["seed"])] = row

    results_path = Path(args.results)
    rows = read_rows(results_path)
    done = {run_key(r["task"], r["variant"], r["config"], r["seed"]) for r in rows}

    plan, skipped, total_s = [], 0, 0.0
    for task in tasks:
        for variant in variants:
            steps = 0 if variant == "zero_shot" else planned_steps(task, args)
            config = run_config(variant, args)
            if args.lr_from:
                if (task, variant) not in chosen_rates:
                    sys.exit(f"--lr-from {args.lr_from}: no --lr-grid row of {task} {variant} with these caps")
                config["lr_from"] = chosen_rates[(task, variant)]
            for seed in seeds:
                if run_key(task, variant, config, seed) in done:
                    skipped += 1
                    continue
                earlier_row = earlier.get(run_key(task, variant, plain_grid_config(config), seed))
                runs = planned_runs(variant, earlier_row, args)
                per_run = CAUSAL_SECONDS_PER_RUN if args.causal else SECONDS_PER_RUN
                estimate = runs * (steps * seconds_per_step(variant, rows, args) + per_run)
                plan.append((task, variant, seed, config, earlier_row, steps, estimate))
                total_s += estimate

    print(f"{len(plan)} runs to do, {skipped} already in {results_path}; "
          f"estimated {total_s / 3600:.2f} h on this machine's rates")
    for task, variant, seed, _, _, steps, estimate in plan:
        print(f"  {task:6s} {variant:12s} seed {seed}  {steps:6d} steps  ~{estimate / 60:.1f} min")
    if args.dry_run:
        return 0

    results_path.parent.mkdir(parents=True, exist_ok=True)
    failures = 0
    for i, (task, variant, seed, config, earlier_row, _, _) in enumerate(plan, 1):
        print(f"[{i}/{len(plan)}] {task} {variant} seed {seed}", flush=True)
        try:
            lr, lr_choice, data_dir = config.get("lr_from", {}).get("lr", args.lr), None, args.data_dir
            if args.on_holdout:
                data_dir = holdout_data_dir(task, seed, args)
            if args.lr_grid and variant != "zero_shot":
                recorded = earlier_row["lr_selection"]["held_out_scores"] if earlier_row else {}
                best, scores, never_trained = choose_lr(task, variant, seed, args, recorded)
                lr = rate_below_cliff(best, map(float, scores), never_trained) if args.lr_off_cliff else best
                lr_choice = {"chosen": lr, "held_out_scores": scores,
                             "held_out_samples": held_out_rows(task, seed, args), "from": "train split",
                             **({"never_trained": never_trained} if never_trained else {}),
                             **({"best_held_out": best} if lr != best else {})}
            key = run_key(task, variant, config, seed)
            out = Path(args.runs_dir) / run_dir_name(task, variant, key, seed)
            if earlier_row is not None and earlier_row["lr"] == lr:
                print(f"  the validation run at lr {lr:g} is in {args.reuse_from}", flush=True)
                row = {**earlier_row, "config": config, "lr_selection": lr_choice, "reused_from": args.reuse_from}
            else:
                results = train_once(task, variant, seed, args, data_dir, out, lr=lr,
                                     max_train_samples=args.max_train_samples,
                                     max_eval_samples=args.max_eval_samples)
                row = row_from_results(task, variant, config, seed, results, lr_choice)
        except RuntimeError as error:  # one broken method must not stop the grid
            failures += 1
            print(f"  failed: {error}", file=sys.stderr, flush=True)
            continue
        with results_path.open("a") as handle:  # appended at once: an interrupted grid loses one run at most
            handle.write(json.dumps(row, sort_keys=True) + "\n")
        metric = row["headline_metric"]
        print(f"  {metric} {row['metrics'][metric]:.4f}  trainable {row['trainable_params']:,}  "
              f"{row['wall_time_s']:.0f} s", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
