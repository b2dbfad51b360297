"""The paper's protocol (arXiv 2601.03858) on the embedded SmolLM2-135M-Instruct, over several seeds.

Per seed: `circuitdyn cpt --preset paper` on the seed documents of N entities (probes before training and
after every epoch: 10 per entity, ROUGE-1 recall, all 264 math and 100 SocialIQA items scored as the paper
does), and after every epoch the head-of-state task circuit (`circuitdyn.pipeline.tasks`) and per-fact circuits of a
few probe facts sampled before training. Once an epoch's circuits are extracted, the previous epoch's merged
weights are deleted (517 MB each; the last one stays so that a killed run resumes). The compact results
(JSON/CSV) are gathered with `--collect DIR`; `examples/results/make_tables.py` turns them into the tables.
Every results file records the IG grid and steps of its circuits (`ig_grid`, `ig_steps`).

The results in `examples/results/` were computed with the task circuit on the right IG grid with 5 steps and
per-fact circuits on the right grid with 3 steps (top-1000), 4 facts, 32 / 16 control items; the README's
"Reproducing the paper on SmolLM2-135M" gives the exact commands. The grids default to `right` here (the
stored results' grid), not to circuitdyn's defaults (`left` for the task, as the paper; `midpoint` per fact):

    python examples/reproduce_paper.py --out RUNS --seeds 42 --epochs 10 --n-math 32 --n-reasoning 16 \
        --task-steps 5 --task-grid right --fact-steps 3 --fact-grid right --facts 4
    python examples/reproduce_paper.py --out RUNS --seeds 42,43,44 --collect examples/results
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd
import torch

from circuitdyn.engine.circuits import CircuitSet, setting
from circuitdyn.engine.settings import IG_GRIDS, PAPER_SETTINGS, AttributionSettings, IGGrid, Storage
from circuitdyn.pipeline.extraction import extract_run
from circuitdyn.pipeline.tasks import extract_task_run, load_task, task_circuit
from circuitdyn.probes.facts import load_facts
from circuitdyn.probes.probes import entities, load_probes, select_entities
from circuitdyn.runs.checkpoints import Checkpoint, Run
from circuitdyn.runs.gguf import default_model_dir
from circuitdyn.training.cpt import MODEL_DIR, CPTConfig, run_cpt


def epoch_run(out: Path, epoch: int) -> Run:
    """The run restricted to one epoch (earlier epochs' weights may already be deleted)."""
    manifest = json.loads((out / "run.json").read_text())
    entry = next(e for e in manifest["epochs"] if e["epoch"] == epoch)
    ck = Checkpoint(
        epoch, out / entry["path"] / MODEL_DIR, entry.get("step"), entry.get("train_loss"), entry.get("content_hash")
    )
    return Run(out, {epoch: ck}, manifest)


def jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    union = (a | b).sum().item()
    return float((a & b).sum().item() / union) if union else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="scratch folder for the runs (outside git)")
    ap.add_argument("--seeds", default="42,43,44")
    ap.add_argument("--entities", type=int, default=20)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--task-steps", type=int, default=10, help="EAP-IG steps of the task circuit (paper: 30)")
    ap.add_argument(
        "--task-grid",
        choices=IG_GRIDS,
        default="right",
        help="IG grid of the task circuit (default right, the stored results' grid; paper: left)",
    )
    ap.add_argument("--fact-steps", type=int, default=5, help="EAP-IG steps of the per-fact circuits")
    ap.add_argument(
        "--fact-grid",
        choices=IG_GRIDS,
        default="right",
        help="IG grid of the per-fact circuits (default right, the stored results' grid; circuitdyn's "
        "default: midpoint)",
    )
    ap.add_argument("--facts", type=int, default=6, help="probe facts sampled before training for per-fact circuits")
    ap.add_argument("--fact-top-n", type=int, default=1000, help="per-fact circuit size for faithfulness/Jaccard")
    ap.add_argument("--n-math", type=int, default=264, help="math items per evaluation (fewer = a labelled subset)")
    ap.add_argument("--n-reasoning", type=int, default=100, help="SocialIQA items per evaluation")
    ap.add_argument("--eval-batch-size", type=int, default=16, help="generation batch (smaller stops earlier at EOS)")
    ap.add_argument(
        "--epoch0-from",
        type=int,
        metavar="SEED",
        help="take epoch 0 (the base model: its probes and circuits do not depend on the seed) from this "
        "seed's run once it is finished, instead of recomputing it",
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--collect", help="only gather the compact results of --out into this folder")
    ap.add_argument(
        "--task-noise",
        help="only measure the task circuit's method noise on the base model: the "
        "Jaccard of its --task-steps circuit with those of these comma-separated other step counts (all on "
        "--task-grid), "
        "written as JSON to this file (e.g. 3,10:examples/results/task_method_noise.json)",
    )
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    root = Path(args.out)
    if args.collect:
        collect(root, seeds, Path(args.collect))
        return
    if args.task_noise:
        steps, dest = args.task_noise.split(":", 1)
        task_noise(args.task_steps, [int(x) for x in steps.split(",")], Path(dest), args.threads, args.task_grid)
        return
    if len(seeds) > 1:
        raise SystemExit("run one seed per process (in parallel); --collect gathers them")
    torch.set_num_threads(args.threads)
    names = entities(select_entities(load_probes(rephrased=False), n=args.entities))
    task = load_task("head-of-state")
    for seed in seeds:
        out = root / f"seed_{seed}"
        circuits = out / "circuits"
        cfg = CPTConfig.paper(
            entities=names,
            seed=seed,
            epochs=args.epochs,
            device="cpu",
            base_model=str(default_model_dir()),
            n_math=args.n_math,
            n_reasoning=args.n_reasoning,
            eval_batch_size=args.eval_batch_size,
        )
        facts_holder: dict[str, object] = {}
        if args.epoch0_from is not None and not (out / "run.json").exists():
            clone_epoch0(root / f"seed_{args.epoch0_from}", out, seed)

        def on_epoch_end(
            epoch: int,
            out: Path = out,
            circuits: Path = circuits,
            seed: int = seed,
            facts_holder: dict[str, object] = facts_holder,
        ) -> None:
            t0 = time.perf_counter()
            run = epoch_run(out, epoch)
            if "facts" not in facts_holder:
                facts_holder["facts"] = load_facts(None, run.tokenizer(), entities=names, sample_n=args.facts, seed=0)
            task_settings = PAPER_SETTINGS.replace(steps=args.task_steps, ig_grid=args.task_grid)
            [task_done] = extract_task_run(run, task, circuits / "task", [epoch], task_settings, runs=1)
            fact_settings = AttributionSettings(steps=args.fact_steps, ig_grid=args.fact_grid)
            [fact_done] = extract_run(
                run,
                facts_holder["facts"],
                circuits / "facts",
                [epoch],  # type: ignore[arg-type]
                fact_settings,
                storage=Storage(top_n=args.fact_top_n),
            )
            t1 = time.perf_counter()
            if epoch > 0:
                prev = out / f"epoch_{epoch - 1}" / MODEL_DIR
                for f in prev.glob("*.safetensors"):
                    f.unlink()
            print(
                f"[seed {seed}] epoch {epoch}: task circuit {task_done.results['mean']}, "
                f"facts {fact_done.path.name}; circuits {t1 - t0:.0f}s",
                flush=True,
            )

        t = time.perf_counter()
        run_cpt(cfg, out, progress=False, on_epoch_end=on_epoch_end)
        print(f"[seed {seed}] done in {time.perf_counter() - t:.0f}s", flush=True)


def clone_epoch0(src: Path, out: Path, seed: int) -> None:
    """Wait for `src`'s finished epoch 0 (probes and circuits), then link it into `out` as this seed's epoch 0."""
    import os
    import shutil

    while not (src / "run.json").is_file() or not list((src / "circuits" / "facts").glob("epoch_0.*.safetensors")):
        time.sleep(20)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src / "epoch_0", out / "epoch_0", copy_function=os.link)
    for sub in ("task", "facts"):
        (out / "circuits" / sub).mkdir(parents=True, exist_ok=True)
        for f in (src / "circuits" / sub).glob("epoch_0.*"):
            os.link(f, out / "circuits" / sub / f.name)
    shutil.copytree(src / "circuits" / "task" / "epoch_0", out / "circuits" / "task" / "epoch_0")
    manifest = json.loads((src / "run.json").read_text())
    manifest["config"]["seed"] = seed
    manifest["epochs"] = [e for e in manifest["epochs"] if e["epoch"] == 0]
    manifest["probe_history"] = [h for h in manifest.get("probe_history", []) if h["epoch"] == 0]
    (out / "run.json").write_text(json.dumps(manifest, indent=2))
    print(f"[seed {seed}] epoch 0 taken from {src}", flush=True)


def task_noise(steps: int, others: list[int], dest: Path, threads: int, ig_grid: IGGrid = "right") -> None:
    """How much the task circuit moves when only the number of IG steps changes (same model, same prompts,
    same grid)."""
    from circuitdyn.engine.attribution import attribute
    from circuitdyn.engine.graph import Graph
    from circuitdyn.pipeline.tasks import task_facts
    from circuitdyn.runs.checkpoints import open_run

    torch.set_num_threads(threads)
    run = open_run(default_model_dir())
    model = run.load_model(0)
    facts = task_facts(load_task("head-of-state"), run.tokenizer()).facts
    graph = Graph.from_model(model)
    masks = {
        m: task_circuit(attribute(model, facts, PAPER_SETTINGS.replace(steps=m, ig_grid=ig_grid)), graph)
        for m in [steps, *others]
    }
    out = {
        "model": "SmolLM2-135M-Instruct (epoch 0)",
        "steps": steps,
        "ig_grid": ig_grid,
        "jaccard": {str(m): jaccard(masks[steps], masks[m]) for m in others},
    }
    dest.write_text(json.dumps(out, indent=1) + "\n")
    print(out)


def circuit_files(folder: Path) -> dict[int, Path]:
    """Each epoch's one circuit file in `folder`; two for an epoch (other IG grid or steps) is refused, so that
    the collected rows and Jaccards never mix settings."""
    files: dict[int, list[Path]] = {}
    for f in folder.glob("epoch_*.safetensors"):
        files.setdefault(int(f.name.split(".")[0].split("_")[1]), []).append(f)
    mixed = {e: sorted(p.name for p in fs) for e, fs in files.items() if len(fs) > 1}
    if mixed:
        raise SystemExit(
            f"{folder} holds circuits of several settings for one epoch: {mixed}; remove those of "
            "the other IG grid or steps before collecting"
        )
    return {e: fs[0] for e, fs in sorted(files.items())}


def collect(root: Path, seeds: list[int], dest: Path) -> None:
    """Compact tables of every finished epoch of every seed: entities, probes, controls, task and fact circuits."""
    from circuitdyn.analysis.dynamics import load_dynamics

    dest.mkdir(parents=True, exist_ok=True)
    ent_rows, ctrl_rows, task_rows, fact_rows, loss_rows, dyn_rows = [], [], [], [], [], []
    for seed in seeds:
        out = root / f"seed_{seed}"
        if not (out / "run.json").is_file():
            continue
        dyn = load_dynamics(out)
        for r in dyn.table().drop(columns=["acquired_names", "forgotten_names"]).to_dict("records"):
            dyn_rows.append({"seed": seed, **r})
        for r in dyn.entity_scores.to_dict("records"):
            ent_rows.append({"seed": seed, **r})
        for d in sorted(out.glob("epoch_*/epoch.json")):
            info = json.loads(d.read_text())
            loss_rows.append(
                {
                    "seed": seed,
                    "epoch": info["epoch"],
                    "train_loss": info["train_loss"],
                    "steps": info["steps"],
                    "learned": len(info["learned"]),
                    "wall_s": info["wall_s"],
                }
            )
            ctrl = json.loads((d.parent / "control_probes_results.json").read_text())
            for name, v in ctrl.items():
                ctrl_rows.append(
                    {
                        "seed": seed,
                        "epoch": info["epoch"],
                        "set": name,
                        "exact_match": v["exact_match"],
                        "n": v["n"],
                        "subset": v.get("subset"),
                    }
                )
        prev_mask = None
        task_files = circuit_files(out / "circuits" / "task")
        for rpath in sorted(
            (out / "circuits" / "task").glob("epoch_*/results.json"), key=lambda p: int(p.parent.name.split("_")[1])
        ):
            epoch = int(rpath.parent.name.split("_")[1])
            res = json.loads(rpath.read_text())
            cfile = task_files[epoch]
            cs = CircuitSet.load(cfile)
            mask = task_circuit(cs.scores, cs.graph, res["settings"]["top_n"])
            task_rows.append(
                {
                    "seed": seed,
                    "epoch": epoch,
                    "baseline_logit_diff": res["baseline"]["logit_diff"],
                    "baseline_hit_at_10": res["baseline"]["hit_at_10"],
                    "circuit_logit_diff": res["mean"]["logit_diff"],
                    "circuit_hit_at_10": res["mean"]["hit_at_10"],
                    "circuit_edges": res["settings"]["circuit_edges"][0],
                    "ig_steps": res["settings"]["ig_steps"],
                    "ig_grid": setting(res["settings"], "ig_grid"),
                    "jaccard_prev": jaccard(mask, prev_mask) if prev_mask is not None else None,
                }
            )
            prev_mask = mask
        prev = None
        for cfile in circuit_files(out / "circuits" / "facts").values():
            cs = CircuitSet.load(cfile)
            epoch = int(cs.meta["epoch"])
            masks = cs.top_n(int(cs.meta["faithfulness_selection"].split(":")[1]))
            for i, fid in enumerate(cs.fact_ids):
                fact_rows.append(
                    {
                        "seed": seed,
                        "epoch": epoch,
                        "fact_id": fid,
                        "m_clean": cs.meta["m_clean"][i],
                        "m_corrupted": cs.meta["m_corrupted"][i],
                        "faithfulness": cs.meta["faithfulness"][i],
                        "selection": cs.meta["faithfulness_selection"],
                        "ig_steps": cs.meta["ig_steps"],
                        "ig_grid": setting(cs.meta, "ig_grid"),
                        "jaccard_prev": jaccard(masks[i], prev[i]) if prev is not None else None,
                    }
                )
            prev = masks
    for name, rows in (
        ("dynamics", dyn_rows),
        ("entities", ent_rows),
        ("controls", ctrl_rows),
        ("task_circuit", task_rows),
        ("fact_circuits", fact_rows),
        ("epochs", loss_rows),
    ):
        pd.DataFrame(rows).to_csv(dest / f"{name}.csv", index=False)
    print(f"collected {len(loss_rows)} seed-epochs into {dest}")


if __name__ == "__main__":
    main()
