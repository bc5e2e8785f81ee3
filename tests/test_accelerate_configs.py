"""The accelerate config files shipped with the recipes parse with accelerate's own config classes and turn into
the launch settings they promise; the 2-process CPU one really runs two processes (slow, RUN_SLOW=1)."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

CONFIGS = Path(__file__).resolve().parents[1] / "hf_cft" / "accelerate_configs"
EXPECTED = {
    # file: (distributed_type, num_processes, launch flags that must be set, mixed precision)
    "single_gpu": ("NO", 1, {}, "bf16"),
    "multi_gpu_ddp": ("MULTI_GPU", 2, {"multi_gpu": True}, "bf16"),
    "fsdp": ("FSDP", 2, {"use_fsdp": True, "fsdp_version": 2}, "bf16"),
    "deepspeed_zero2": ("DEEPSPEED", 2, {"use_deepspeed": True, "zero_stage": 2}, "bf16"),
    "cpu_2proc": ("MULTI_GPU", 2, {"multi_gpu": True, "use_cpu": True}, "no"),
    "multi_node_ddp": ("MULTI_GPU", 16, {"multi_gpu": True, "num_machines": 2, "machine_rank": 0}, "bf16"),
}


def test_every_shipped_config_is_listed():
    assert {p.stem for p in CONFIGS.glob("*.yaml")} == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_parses_and_launches_as_documented(name):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    file = str(CONFIGS / f"{name}.yaml")
    dist, procs, flags, precision = EXPECTED[name]
    cfg = load_config_from_file(file)  # raises on unknown top-level keys
    assert isinstance(cfg, ClusterConfig)
    assert cfg.distributed_type.value == dist and cfg.num_processes == procs and cfg.mixed_precision == precision
    parser = launch_command_parser()
    known = {a.dest for a in parser._actions}
    for section, prefix in (("fsdp_config", "fsdp_"), ("deepspeed_config", "")):
        for key in getattr(cfg, section):
            # accelerate copies these onto launch arguments of the same name (fsdp_ added where missing), silently
            # creating attributes for unknown ones: a typo would be ignored without this check
            launch_key = key if key.startswith(prefix) else prefix + key
            assert launch_key in known, f"{name}: {section}.{key} is not an accelerate launch option"
    args, _, _ = _validate_launch_command(parser.parse_args(["--config_file", file, "train.py"]))
    for flag, value in flags.items():
        assert getattr(args, flag) == value, (name, flag)
    assert args.num_processes == procs and args.mixed_precision == precision
    # the environment the launcher would give the processes (no process is started)
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = list(cfg.deepspeed_config)
        _, env = prepare_deepspeed_cmd_env(args)
        assert env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == "2"
    elif args.multi_gpu or args.use_fsdp:
        env = prepare_multi_gpu_env(args)
        if args.use_fsdp:
            assert env["FSDP_VERSION"] == "2" and env["FSDP_TRANSFORMER_CLS_TO_WRAP"] == "CLIPEncoderLayer"
            assert env["FSDP_STATE_DICT_TYPE"] == "FULL_STATE_DICT"
    assert args.mixed_precision == precision


PROBE = textwrap.dedent(
    """
    import json, sys
    import hf_cft
    import torch
    from accelerate import Accelerator
    from hf_cft.data import from_arrays
    from hf_cft.models import evaluate_zeroshot
    from hf_cft.testing import tiny_clip
    sys.path.insert(0, {tests!r})
    from conftest import ToyTokenizer
    import numpy as np

    acc = Accelerator()
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (30, 30, 3)).astype(np.uint8) for _ in range(10)]
    ds = from_arrays(images, [i % 3 for i in range(10)], ["cat", "dog", "sea lion"])["train"]
    res = evaluate_zeroshot(tiny_clip(), ToyTokenizer(), ds, batch_size=2, accelerator=acc)
    total = acc.reduce(torch.tensor([1.0]), "sum").item()
    if acc.is_main_process:
        json.dump({{"hf_cft": hf_cft.__file__, "processes": acc.num_processes, "type": str(acc.distributed_type), "ranks": total,
                   "accuracy": res.accuracy, "total": res.total}}, open({out!r}, "w"))
    acc.wait_for_everyone()
    acc.end_training()  # destroys the process group: no gloo teardown race at interpreter exit
    """
)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("RUN_SLOW"), reason="launches two processes (~30 s); set RUN_SLOW=1")
def test_cpu_2proc_config_runs_two_cpu_processes_with_one_process_results(tmp_path):
    import numpy as np

    from hf_cft.data import from_arrays
    from hf_cft.models import evaluate_zeroshot
    from hf_cft.testing import tiny_clip

    script, out = tmp_path / "probe.py", tmp_path / "out.json"
    script.write_text(PROBE.format(tests=str(Path(__file__).parent), out=str(out)))
    repo = str(Path(__file__).resolve().parents[1])  # this checkout's hf_cft, not another installed one
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": repo}
    accelerate = Path(sys.executable).with_name("accelerate")
    proc = subprocess.run(
        [str(accelerate), "launch", "--config_file", str(CONFIGS / "cpu_2proc.yaml"), str(script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=repo,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(out.read_text())
    assert got["hf_cft"].startswith(repo)
    assert got["processes"] == 2 and got["ranks"] == 2.0 and got["type"] == "DistributedType.MULTI_CPU"
    # sharded over two processes, gathered: the same numbers as one process
    from conftest import ToyTokenizer

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (30, 30, 3)).astype(np.uint8) for _ in range(10)]
    ds = from_arrays(images, [i % 3 for i in range(10)], ["cat", "dog", "sea lion"])["train"]
    one = evaluate_zeroshot(tiny_clip(), ToyTokenizer(), ds, batch_size=2)
    assert got["total"] == one.total == 10 and got["accuracy"] == one.accuracy


@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("same_network", [True, False])
def test_multi_node_config_gives_torchrun_the_machines(rank, same_network):
    """The multi-machine example: 16 processes over 2 machines = 8 per machine, this machine's rank from
    ``--machine_rank``, and machine 0's address and port as torchrun's master (``--same_network``) or as the
    rendezvous endpoint. accelerate 1.15 copies a top-level key from the file only onto an argument whose default is
    None, so the file's ``same_network: true`` (a store_true flag, default False) is ignored: the flag is given on the
    command line, as docs/distributed.md says."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    file = str(CONFIGS / "multi_node_ddp.yaml")
    argv = ["--config_file", file, "--machine_rank", str(rank), "--main_process_port", "0"]
    argv += ["--same_network"] if same_network else []
    args, _, _ = _validate_launch_command(launch_command_parser().parse_args([*argv, "t.py"]))
    port = args.main_process_port
    prepare_multi_gpu_env(args)
    assert (args.nproc_per_node, args.nnodes, args.node_rank) == ("8", "2", rank)
    assert args.same_network is same_network
    if same_network:
        assert (args.master_addr, args.master_port) == ("10.0.0.1", str(args.main_process_port))
    else:
        assert args.rdzv_endpoint == f"10.0.0.1:{args.main_process_port}" and not hasattr(args, "master_addr")
    assert port == 0 and int(args.main_process_port) > 0  # 0: a free port; a real multi-machine run fixes one


def test_shipped_configs_are_package_data_with_a_path_helper_and_cli(capsys):
    """``pip install`` users name the configs: they are package data of ``hf_cft.accelerate_configs`` (one copy),
    ``config_path`` / ``hf-cft config path`` / ``python -m hf_cft.accelerate_configs`` resolve a name, and an
    unknown name is a typed error listing the shipped ones."""
    import tomllib

    from hf_cft import accelerate_configs
    from hf_cft.cli import main
    from hf_cft.errors import OptionError

    project = tomllib.loads((CONFIGS.parents[1] / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "hf_cft.accelerate_configs" in project["packages"]
    assert project["package-data"]["hf_cft.accelerate_configs"] == ["*.yaml"]
    assert not (CONFIGS.parents[1] / "recipes" / "accelerate_configs").exists()  # no second copy
    assert set(accelerate_configs.available()) == set(EXPECTED)
    assert (
        accelerate_configs.config_path("fsdp") == accelerate_configs.config_path("fsdp.yaml") == CONFIGS / "fsdp.yaml"
    )
    for bad in ("nope", "../pyproject", ""):
        with pytest.raises(OptionError, match="shipped: cpu_2proc, deepspeed_zero2, fsdp"):
            accelerate_configs.config_path(bad)
    assert main(["config", "path", "multi_node_ddp"]) == 0
    assert capsys.readouterr().out.strip() == str(CONFIGS / "multi_node_ddp.yaml")
    assert main(["config", "show", "fsdp"]) == 0 and "fsdp_version: 2" in capsys.readouterr().out
    assert main(["config", "list"]) == 0 and "multi_node_ddp" in capsys.readouterr().out
    assert main(["config", "path", "nope"]) == 2 and "no shipped accelerate config 'nope'" in capsys.readouterr().err
    proc = subprocess.run(
        [sys.executable, "-m", "hf_cft.accelerate_configs", "cpu_2proc"],
        capture_output=True,
        text=True,
        cwd=str(CONFIGS.parents[1]),
        env={**os.environ, "PYTHONPATH": str(CONFIGS.parents[1])},
        check=True,
    )
    assert proc.stdout.strip() == str(CONFIGS / "cpu_2proc.yaml")


def test_config_list_prints_every_description_whole_and_wrapped(capsys, monkeypatch):
    from hf_cft import accelerate_configs
    from hf_cft.cli import main

    described = accelerate_configs.available()
    # the description goes on past the first line of the file (issue 18: it was cut after "of one")
    assert described["deepspeed_zero2"].endswith("over all GPUs of one machine. Needs `pip install deepspeed`.")
    assert described["multi_node_ddp"] == "DDP over several machines: 2 machines x 8 GPUs here."
    for name, what in described.items():
        head = (CONFIGS / f"{name}.yaml").read_text().splitlines()[0].lstrip("# ")
        assert (what.startswith(head) or head.startswith(what)) and "accelerate launch" not in what
    monkeypatch.setenv("COLUMNS", "64")
    assert main(["config", "list"]) == 0
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) <= 64
    blocks = {}
    for line in out.splitlines():
        if not line.startswith(" "):
            name, _, rest = line.partition(" ")
            blocks[name] = [rest]
        else:
            blocks[name].append(line)
    assert {n: " ".join(" ".join(b).split()) for n, b in blocks.items()} == described
