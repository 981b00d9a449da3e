"""Several processes on CPU (gloo): ``ttpeft train`` under torchrun trains as one process would on the same
global batch and only the main process writes; FSDP2 shards TT adapters and saving gathers them whole.

Run as a script (under torchrun) this file is also the FSDP2 worker of ``test_fsdp2_...``.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DATA = ["--data-dir", "embedded", "--task", "sst2", "--max-train-samples", "16", "--max-eval-samples", "8",
        "--max-length", "32", "--epochs", "2", "--lr", "0.01", "--warmup-fraction", "0", "--no-progress"]
# Same global batch (8) either way. The per-process means averaged by the all-reduce sum the same per-example
# gradients in another order than one mean over 8 (and each process pads to its own longest sentence, which
# changes the matmul shapes), so float32 results agree to ~1e-7, not bit for bit. A wrong data split or a
# loss scaled by the number of processes moves the cores by ~1e-3.
ATOL = 2e-5

# Records, per rank, every file written, folder made, renamed or removed under $TTPEFT_TEST_WATCH.
AUDIT = '''
import os, sys
_watch, _log, _rank = os.environ.get("TTPEFT_TEST_WATCH"), os.environ.get("TTPEFT_TEST_LOG"), os.environ.get("RANK")
_busy = []

def _hook(event, args):
    if _busy or event not in ("open", "os.mkdir", "os.rename", "os.remove", "os.rmdir", "shutil.rmtree"):
        return
    if event == "open":
        path, mode, flags = args
        if not (mode and any(c in mode for c in "wax+")) and not (mode is None and flags & (os.O_WRONLY | os.O_RDWR)):
            return
    path = args[0]
    if isinstance(path, (str, bytes, os.PathLike)) and os.fsdecode(path).startswith(_watch):
        _busy.append(1)
        try:
            with open(f"{_log}.rank{_rank}", "a") as f:
                f.write(f"{event} {os.fsdecode(path)}\\n")
        finally:
            _busy.pop()

if _watch and _rank is not None:
    sys.addaudithook(_hook)
'''


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _torchrun(processes: int, *args, env=None):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)


def _adapter(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory):
    from tiny_models import save_tiny_classifier

    return save_tiny_classifier(tmp_path_factory.mktemp("models") / "bert")


@pytest.mark.slow
def test_torchrun_two_processes_train_like_one_and_only_the_main_process_writes(tiny_classifier, tmp_path,
                                                                                  capsys):
    from ttpeft.cli import main

    runs, hooks = tmp_path / "runs", tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(AUDIT)
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(hooks), os.environ.get("PYTHONPATH")])),
           "TTPEFT_TEST_WATCH": str(runs), "TTPEFT_TEST_LOG": str(tmp_path / "writes")}
    result = _torchrun(2, "-m", "ttpeft", "train", "--model", tiny_classifier, *DATA, "--batch-size", "4",
                       "--output-dir", str(runs / "ddp"), env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("ttpeft train:") == 1  # one summary, from the main process
    assert "2 processes" in result.stdout

    # the same global batches in one process (the shuffled order depends on the seed only, not on the split)
    single = tmp_path / "single"
    assert main(["train", "--model", tiny_classifier, *DATA, "--batch-size", "8", "--output-dir", str(single)]) == 0
    capsys.readouterr()
    ddp, one = _adapter(runs / "ddp"), _adapter(single)
    assert ddp.keys() == one.keys()
    last_cores = [name for name in one if name.endswith("ttlora_cores.5")]
    assert last_cores and all(one[name].abs().max() > 1e-3 for name in last_cores)  # trained (they start at zero)
    for name in one:
        torch.testing.assert_close(ddp[name], one[name], rtol=0, atol=ATOL, msg=name)
    saved = json.loads((runs / "ddp" / "results.json").read_text())
    alone = json.loads((single / "results.json").read_text())
    assert saved["train"]["processes"] == 2 and saved["train"]["global_batch_size"] == 8
    assert saved["train"]["steps"] == alone["train"]["steps"] == 4
    assert saved["train"]["train_loss"] == pytest.approx(alone["train"]["train_loss"], abs=1e-5)

    # only the main process touched the output folder: one run folder, no staging or scratch left
    assert [p.name for p in runs.iterdir()] == ["ddp"]
    main_writes = (tmp_path / "writes.rank0").read_text()
    assert ".ddp.partial-" in main_writes and ".ttpeft-trainer-" in main_writes  # the audit sees writes
    assert not (tmp_path / "writes.rank1").exists()


def test_fsdp_launch_on_cpu_is_refused_instead_of_running_ddp(tiny_classifier, tmp_path, monkeypatch, capsys):
    """accelerate launch with distributed_type FSDP sets ACCELERATE_USE_FSDP; accelerate shards only on GPUs and
    would quietly run CPU processes as DDP."""
    from ttpeft.cli import main

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    code = main(["train", "--model", tiny_classifier, *DATA, "--output-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "accelerate launch asked for FSDP" in err and "configs/accelerate/ddp.yaml" in err
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------- FSDP2

LLAMA_TARGETS = ["q_proj", "v_proj"]


def _train_tiny_llama(model_dir: str, output_dir: Path, sharded: bool) -> None:
    """Four steps of TT-LoRA on the tiny LLaMA with global batches of 8, split over the processes when
    ``sharded`` (FSDP2: each decoder layer, then the root, as accelerate's TRANSFORMER_BASED_WRAP does),
    evaluated by every process, saved by the main one."""
    from transformers import DataCollatorForSeq2Seq, set_seed

    from ttpeft import training
    from ttpeft.methods import get_method
    from ttpeft.tasks import get_task, load_task_data

    rank, world = 0, 1
    if sharded:
        import torch.distributed as dist
        from torch.distributed.fsdp import fully_shard

        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    task, method = get_task("sst2"), get_method("ttlora")
    data = load_task_data(task, "embedded")
    model, tokenizer = training.load_model(training.resolve_model(model_dir), task, training.CAUSAL_LM)
    set_seed(0)
    model, _ = training.apply_method(model, method, {"target_modules": LLAMA_TARGETS, "init": "random"},
                                     training.CAUSAL_LM)
    if sharded:
        for layer in model.base_model.model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        training.prepare_for_sharding(model)
    features = training.featurize(task, tokenizer, data.train.select(range(32)), training.CAUSAL_LM, 32)
    collate = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for start in range(0, 32, 8):
        rows = [features[i] for i in range(start, start + 8)]
        # the Trainer's causal-LM loss: summed over this process's answer tokens, divided by the global count,
        # times the number of processes (FSDP averages gradients over processes)
        tokens = sum((torch.tensor(row["labels"][1:]) != -100).sum() for row in rows)
        batch = collate(rows[rank * 8 // world:(rank + 1) * 8 // world])
        loss = model(**batch, num_items_in_batch=tokens).loss * world
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    metrics = training.evaluate(model, tokenizer, task, data.validation.select(range(8)), training.CAUSAL_LM, 32, 4,
                                progress=False)
    state_dict = None
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # what accelerate's get_state_dict does for FSDP2 (the Trainer path on GPUs)
        state_dict = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        training.write_run(output_dir, model, method, {"metrics": metrics, "processes": world}, state_dict)
    if sharded:
        dist.barrier()
        dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp2_shards_tt_cores_and_saving_gathers_the_full_adapter(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tiny_models import save_tiny_llama
    from ttpeft import training
    from ttpeft.tasks import get_task, load_task_data

    model_dir = save_tiny_llama(tmp_path / "llama")
    result = _torchrun(2, str(Path(__file__).resolve()), model_dir, str(tmp_path / "runs" / "fsdp"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["fsdp"]
    _train_tiny_llama(model_dir, tmp_path / "single", sharded=False)

    sharded, single = _adapter(tmp_path / "runs" / "fsdp"), _adapter(tmp_path / "single")
    assert sharded.keys() == single.keys() and any("ttlora_cores" in name for name in single)
    for name in single:  # full-size cores, not one process's shard; trained as one process would
        assert sharded[name].shape == single[name].shape, name
        torch.testing.assert_close(sharded[name], single[name], rtol=0, atol=ATOL, msg=name)

    # the saved adapter loads onto a fresh base with its full cores and reproduces the processes' metric
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    reloaded = PeftModel.from_pretrained(base, str(tmp_path / "runs" / "fsdp"))
    loaded = {name: p for name, p in reloaded.named_parameters() if "ttlora_cores" in name}
    assert len(loaded) == sum("ttlora_cores" in name for name in sharded)
    for name, param in loaded.items():
        torch.testing.assert_close(param.detach(), sharded[name.replace(".default", "")], rtol=0, atol=0)
    task = get_task("sst2")
    tokenizer = training.load_model(training.resolve_model(model_dir), task, training.CAUSAL_LM)[1]
    validation = load_task_data(task, "embedded").validation.select(range(8))
    metrics = training.evaluate(reloaded, tokenizer, task, validation, training.CAUSAL_LM, 32, 4, progress=False)
    saved = json.loads((tmp_path / "runs" / "fsdp" / "results.json").read_text())
    assert saved["processes"] == 2 and saved["metrics"] == metrics


@pytest.mark.skipif(not torch.cuda.is_available(), reason="accelerate's FSDP plugin shards only on GPUs")
@pytest.mark.slow
def test_cli_fsdp_on_a_gpu_saves_the_full_adapter(tmp_path):
    from tiny_models import save_tiny_llama

    model_dir = save_tiny_llama(tmp_path / "llama")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "configs/accelerate/fsdp.yaml"), "--num_processes", "1", "--main_process_port",
               str(_free_port()), "-m", "ttpeft", "train", "--model", model_dir, *DATA, "--batch-size", "4",
               "--output-dir", str(tmp_path / "run")]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["train"]["distributed"] == "fsdp"
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import ttpeft  # noqa: F401

    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), str(tmp_path / "run"))
    cores = [p for name, p in reloaded.named_parameters() if "ttlora_cores" in name]
    assert cores and all(p.numel() > 0 for p in cores)


if __name__ == "__main__":  # the FSDP2 worker: python -m torch.distributed.run ... test_distributed.py MODEL OUT
    import ttpeft  # noqa: F401

    _train_tiny_llama(sys.argv[1], Path(sys.argv[2]), sharded=True)
