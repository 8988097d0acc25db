"""Scale benchmark: stream-prune full-size visual towers (EVA02-E-14-plus, ViT-g-14) from disk.

For each model: write a visual-tower checkpoint of random bf16 weights one tensor at a time
(never the whole model in RAM), then run ``python -m pruning prune`` on it in a child process
at r=1 and r=2 with ``diversity``, recording wall time, the child's peak RSS (``wait4``
rusage, plus anonymous/file-backed peaks polled from /proc), its CPU seconds (the machine is
shared: wall time alone mixes in other load) and the parameter counts. Writes
``bench/results/stream_prune.json``; the temporary files are deleted at the end.

    .venv/bin/python bench/stream_prune.py [--models EVA02-E-14-plus ViT-g-14] [--ratios 1 2]
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this folder comes first on sys.path and bench/select.py would shadow the
# standard library's ``select`` that subprocess needs.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from pruning.export import resolve_architecture  # noqa: E402
from pruning.safetensors_stream import SafetensorsWriter  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "stream_prune.json"
GIB = 1024 ** 3


def write_random_visual_checkpoint(model: str, path: Path, dtype: torch.dtype) -> dict:
    """Random weights for every tensor of ``model.visual``, generated and written one at a time."""
    arch = resolve_architecture(model)
    state = arch.tower.state_dict()  # meta tensors: names and shapes only
    specs = [(k, tuple(v.shape), dtype) for k, v in state.items()]
    g = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    with SafetensorsWriter(path, specs) as writer:
        for name, shape, _ in specs:
            writer.write(name, (torch.randn(shape, generator=g) * 0.02).to(dtype))
    return {"seconds": round(time.perf_counter() - start, 1), "bytes": path.stat().st_size,
            "tensors": len(specs), "elements": sum(v.numel() for v in state.values())}


def _poll_rss(pid: int, peaks: dict[str, int], stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    key, _, value = line.partition(":")
                    if key in ("RssAnon", "RssFile", "VmRSS"):
                        peaks[key] = max(peaks.get(key, 0), int(value.split()[0]) * 1024)
        except (FileNotFoundError, ProcessLookupError, ValueError):
            return
        stop.wait(0.2)


def prune_in_child(model: str, checkpoint: Path, ratio: float, out: Path) -> dict:
    """Run the CLI in a child process; its wall time, peak RSS and the written report's counts."""
    cmd = [sys.executable, "-m", "pruning", "prune", "--model", model, "--checkpoint", str(checkpoint),
           "--ratio", str(ratio), "--method", "diversity", "--out", str(out), "--quiet"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    logs = out.parent / f"{out.name}.log"
    with open(logs, "w+") as log:
        start = time.perf_counter()
        child = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        peaks: dict[str, int] = {}
        stop = threading.Event()
        poller = threading.Thread(target=_poll_rss, args=(child.pid, peaks, stop), daemon=True)
        poller.start()
        # wait4 gives this child's own rusage (RUSAGE_CHILDREN would mix in earlier children).
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - start
        stop.set()
        poller.join()
        child.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        stdout = log.read()
    if child.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({child.returncode}):\n{stdout}")
    report = json.loads((out / "pruning_report.json").read_text())
    weights = out / report["weights_file"]
    return {
        "ratio": ratio, "wall_seconds": round(seconds, 1),
        "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1),  # wall/cpu shows CPU contention
        "peak_rss_gib": round(usage.ru_maxrss * 1024 / GIB, 3),
        "peak_rss_anon_gib": round(peaks.get("RssAnon", 0) / GIB, 3),
        "peak_rss_file_gib": round(peaks.get("RssFile", 0) / GIB, 3),
        "blocks": len(report["sites"]), "hidden_after": report["sites"][0]["hidden_after"],
        "params_before": report["model_params_before"], "params_after": report["model_params_after"],
        "param_reduction": round(1 - report["model_params_after"] / report["model_params_before"], 4),
        "output_bytes": weights.stat().st_size, "stock_loadable": report["stock_loadable"],
        "cli_stdout": stdout.strip(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["EVA02-E-14-plus", "ViT-g-14"])
    parser.add_argument("--ratios", nargs="+", type=float, default=[1.0, 2.0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp"), help="where the temporary checkpoints go")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    usage = shutil.disk_usage(args.workdir)
    print(f"free space in {args.workdir}: {usage.free / GIB:.1f} GiB", flush=True)
    results = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                           "torch_threads": torch.get_num_threads(),
                           "load_average_at_start": os.getloadavg()},
               "storage_dtype": "bfloat16", "method": "diversity", "models": {}}
    tmp = Path(tempfile.mkdtemp(prefix="stream_prune_bench-", dir=args.workdir))
    try:
        for model in args.models:
            ckpt = tmp / f"{model}-visual.safetensors"
            written = write_random_visual_checkpoint(model, ckpt, torch.bfloat16)
            print(f"{model}: wrote {written['bytes'] / GIB:.2f} GiB ({written['elements']:,} elements) "
                  f"in {written['seconds']} s", flush=True)
            runs = []
            for ratio in args.ratios:
                out = tmp / f"{model}-r{ratio:g}"
                run = prune_in_child(model, ckpt, ratio, out)
                shutil.rmtree(out)
                runs.append(run)
                print(f"{model} r={ratio:g}: {run['blocks']} blocks in {run['wall_seconds']} s, peak RSS "
                      f"{run['peak_rss_gib']} GiB (anon {run['peak_rss_anon_gib']}, file {run['peak_rss_file_gib']}), "
                      f"params {run['params_before']:,} -> {run['params_after']:,} "
                      f"(-{100 * run['param_reduction']:.1f}%)", flush=True)
            results["models"][model] = {"checkpoint": written, "runs": runs}
            ckpt.unlink()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    results["machine"]["load_average_at_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
