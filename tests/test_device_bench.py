"""The GPU table's script (scripts/device_bench.py, issue 29) rehearses on the CPU: the same code a lent GPU runs,
at tiny sizes, so it cannot rot between the rare sessions that have a GPU. The LeRobot policies' rehearsal is in
test_lerobot.py (their environment)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "device_bench.py"
CUDA_ONLY = "cuda_graphs needs the policy on a CUDA device"


def device_bench():
    """The script as a module (registered first: its dataclasses look their module up)."""
    if "device_bench" not in sys.modules:
        spec = importlib.util.spec_from_file_location("device_bench", SCRIPT)
        sys.modules["device_bench"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["device_bench"])
    return sys.modules["device_bench"]


def rehearse(out: Path, subjects: list[str]) -> dict:
    """Runs the rehearsal as the issue writes it and checks what every GPU row must show on the CPU."""
    subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--tiny", "--out", str(out), "--only",
                    ",".join(subjects)], check=True, capture_output=True, text=True, timeout=1200)
    results = json.loads((out / "results.json").read_text())
    bench = device_bench()
    for label in subjects:
        subject = next(s for s in bench.SUBJECTS if s.label == label)
        rows = [row for row in results["rows"] if row["subject"] == label]
        planned = [("lerobot", "lerobot-eager")] * subject.lerobot + bench.row_plan(subject, tiny=True)
        assert [(row["profile"], row["backend"]) for row in rows] == planned
        for row in rows:
            if row["backend"].startswith("cuda_graphs"):  # the CUDA path fails with its reason, and the run goes on
                assert row["status"] == "failed" and CUDA_ONLY in row["note"], row
                continue
            assert row["status"] == "ok", row
            assert row["samples"] == 2 * 8 and row["p50_ms"] > 0  # 2 rounds over 2 sequences of 4 frames
            if row["profile"] == "lerobot":
                continue
            assert row["recompiled_frames"] == 0
            if row["profile"] == "none" and row["backend"].endswith("bf16"):
                assert 0 < row["max_abs_action_diff"] < 1.0  # ran in bf16, near float32's actions
        compiled = next(row for row in rows if row["backend"] == "compile-bf16")
        assert compiled["frames_compiled_warm_up"] > 0 and compiled["warm_up_s"] > 0
        again = rows[-1]  # the baseline after every other row: each removal gave float32 back exactly
        assert (again["profile"], again["backend"]) == ("none", "eager-fp32") and again["max_abs_action_diff"] == 0
        assert f"| {label} |" in (out / "table.md").read_text()
    assert (out / "latency.png").stat().st_size > 10_000
    return results


def test_the_gpu_table_rehearses_on_the_cpu_and_resumes_an_earlier_run(tmp_path):
    first = rehearse(tmp_path / "first", ["ref_dit"])
    # The next lent GPU measures what the last one left out: measured rows are kept, baselines measured again.
    subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--tiny", "--out", str(tmp_path / "second"),
                    "--only", "ref_dit", "--resume", str(tmp_path / "first")], check=True, capture_output=True,
                   text=True, timeout=600)
    second = json.loads((tmp_path / "second" / "results.json").read_text())["rows"]
    assert len(second) == len(first["rows"])
    for before, after in zip(first["rows"], second, strict=True):
        baseline = (after["profile"], after["backend"]) == ("none", "eager-fp32")
        if before["status"] == "ok" and not baseline:  # kept; its ratios are against this run's baseline
            ratios = ("speedup", "speedup_vs_lerobot", "note")
            assert {k: v for k, v in after.items() if k not in ratios} == \
                {k: v for k, v in before.items() if k not in ratios}
            assert after["note"] == f"from {tmp_path / 'first'}"
        else:
            assert after["status"] == before["status"] and "from" not in after["note"]  # measured again


def test_what_travels_to_the_device_and_what_stays():
    bench = device_bench()
    assert not bench.must_stay(REPO / "benchmarks" / "gpu" / "inputs.npz", ())
    assert bench.must_stay(REPO / "benchmarks" / "main_job" / "bench.md", ())
    weights = REPO / "checkpoints" / "ref_dit" / "model.safetensors"
    assert bench.must_stay(weights, ()) and not bench.must_stay(weights, ("ref_dit",))
    assert not bench.must_stay(REPO / "checkpoints" / "ref_dit" / "config.json", ())
    # The ref_dit call (no wheels) fits the 64 MiB a device call carries; the inputs it reads travel.
    call = next(call for call in bench.device_calls() if call["subjects"] == ["ref_dit"])
    travels = [path for path in bench.tracked_files()
               if path.exists() and not bench.must_stay(path, call["keep_weights"])]
    assert sum(path.stat().st_size for path in travels) < bench.DEVICE_LIMIT_BYTES
    assert bench.INPUTS.with_suffix(".npz") in travels and weights in travels

