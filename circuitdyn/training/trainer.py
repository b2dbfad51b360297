"""circuitdyn inside someone else's training loop: a `transformers.TrainerCallback`.

Add one line to a training script, `trainer.add_callback(ProbeCallback(entities=[...]))`, and the probe sets
are scored on the model before training (written to `OUTPUT_DIR/baseline/`) and at every checkpoint save
(written into `OUTPUT_DIR/checkpoint-STEP/` beside the weights), in the files `circuitdyn cpt` writes, so
`circuitdyn dynamics OUTPUT_DIR`, `circuitdyn timeline OUTPUT_DIR` and the other commands read the Trainer run
like one of ours. Optionally it extracts the per-fact circuits of every saved checkpoint (into
`OUTPUT_DIR/circuits/`, where `timeline` finds them), and a stopping rule (`circuitdyn.analysis.stopping`) stops
training when the probe history says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback

from circuitdyn.analysis.stopping import StoppingRule, history_from_dynamics, parse_rule
from circuitdyn.engine.settings import AttributionSettings
from circuitdyn.errors import CircuitdynError
from circuitdyn.probes.probes import load_probes, select_entities
from circuitdyn.training.cpt import CPTConfig, Prober, _learned, _write_results

if TYPE_CHECKING:
    from transformers import (
        PreTrainedTokenizerBase,
        TrainerControl,
        TrainerState,
        TrainingArguments,
    )

BASELINE_DIR = "baseline"


CALLBACK_SETTINGS = AttributionSettings(steps=5)
"""The circuits `ProbeCallback(circuits=True)` extracts: EAP-IG with 5 steps on the midpoint rule."""


class ProbeCallback(TrainerCallback):
    """Score probes on the base model and at every checkpoint save; optionally extract circuits and stop early.

    `config`: the probing half of a `cpt.CPTConfig` (default `CPTConfig()`): `probes` (probe file, seed JSON or
    circuitdyn JSONL; default the packaged seed probes), `n_entities` balanced seed entities unless `entities`
    are named, the out-of-domain control probes `n_math` / `n_reasoning` (0 = none), `threshold`, `template`,
    `max_new_tokens`, `eval_batch_size`, the instruction; its training fields are not used (the Trainer trains).
    `circuits`: also extract each saved checkpoint's per-fact circuits for `facts_per_entity` probes per
    entity, with these `AttributionSettings` (True: `CALLBACK_SETTINGS`). `stop`: a stopping rule
    (`NAME[:PARAM]` or a `StoppingRule`) asked after every save. `base`: the base model folder of adapter
    checkpoints when their `base_model_name_or_path` is not a local folder. `tokenizer`: default the Trainer's.
    """

    def __init__(
        self,
        config: CPTConfig | None = None,
        *,
        entities: Sequence[str] | None = None,
        circuits: AttributionSettings | bool = False,
        facts_per_entity: int = 3,
        stop: str | StoppingRule | None = None,
        base: str | Path | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
    ) -> None:
        cfg = config or CPTConfig()
        self.cfg = replace(
            cfg,
            probes=None if cfg.probes is None else str(cfg.probes),
            n_math=cfg.n_math or None,
            n_reasoning=cfg.n_reasoning or None,
        )
        self.cfg.validate()
        self.probes = select_entities(
            load_probes(self.cfg.probes), list(entities) if entities else None, n=self.cfg.n_entities
        )
        self.entities = list(dict.fromkeys(p.entity for p in self.probes))
        self.circuits: AttributionSettings | None = (
            CALLBACK_SETTINGS if circuits is True else circuits if isinstance(circuits, AttributionSettings) else None
        )
        self.facts_per_entity = facts_per_entity
        self.rule = parse_rule(stop) if stop is not None else None
        self.base = base
        self.tokenizer = tokenizer
        self._prober: Prober | None = None
        self.learned: dict[int, list[str]] = {}
        """Global step -> the entities learned at that save (step 0: the base model)."""
        self.stopped_at: int | None = None
        """The global step at which the stopping rule stopped training (None while it has not)."""

    def _score(self, model: Any, folder: Path, tokenizer: PreTrainedTokenizerBase | None) -> list[str]:
        tok = self.tokenizer or tokenizer
        if tok is None:
            raise CircuitdynError(
                "ProbeCallback needs a tokenizer: pass tokenizer=... or give the Trainer a processing_class"
            )
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        if self._prober is None:
            self._prober = Prober(tok, self.probes, self.cfg, progress=False)
        was_training = model.training
        model.eval()
        try:
            rows, control = self._prober.evaluate(model)
        finally:
            model.train(was_training)
        folder.mkdir(parents=True, exist_ok=True)
        _write_results(folder, rows, control, self.cfg.threshold)
        return sorted(_learned(rows, self.cfg.threshold))

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: Any = None,
        processing_class: Any = None,
        **kwargs: Any,
    ) -> None:
        if state.is_world_process_zero and state.global_step == 0:
            assert args.output_dir is not None  # the Trainer sets it
            folder = Path(args.output_dir) / BASELINE_DIR
            self.learned[0] = self._score(model, folder, processing_class or kwargs.get("tokenizer"))

    def on_save(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: Any = None,
        processing_class: Any = None,
        **kwargs: Any,
    ) -> TrainerControl:
        if not state.is_world_process_zero:
            return control
        assert args.output_dir is not None  # the Trainer sets it
        out = Path(args.output_dir)
        folder = out / f"checkpoint-{state.global_step}"
        if not folder.is_dir():
            raise CircuitdynError(f"{folder}: the Trainer saved no checkpoint folder here")
        self.learned[state.global_step] = self._score(model, folder, processing_class or kwargs.get("tokenizer"))
        if self.circuits:
            self._extract(out, processing_class or kwargs.get("tokenizer"))
        if self.rule is not None and self.should_stop(out):
            control.should_training_stop = True
            self.stopped_at = state.global_step
        return control

    def should_stop(self, output_dir: str | Path) -> bool:
        """The stopping rule on the probe history written so far (online)."""
        from circuitdyn.analysis.dynamics import load_dynamics

        if self.rule is None:
            return False
        return self.rule.should_stop(history_from_dynamics(load_dynamics(output_dir, threshold=self.cfg.threshold)))

    def _extract(self, out: Path, tokenizer: PreTrainedTokenizerBase | None) -> None:
        """Circuits of every checkpoint saved so far that has none yet (finished ones are reused)."""
        from circuitdyn.pipeline.extraction import extract_run
        from circuitdyn.probes.facts import load_facts
        from circuitdyn.runs.checkpoints import circuits_dir, open_run

        run = open_run(out, base=self.base)
        facts = load_facts(
            self.cfg.probes,
            self.tokenizer or tokenizer or run.tokenizer(),
            entities=self.entities,
            per_entity=self.facts_per_entity,
        )
        extract_run(run, facts, circuits_dir(run), run.epochs, self.circuits)
