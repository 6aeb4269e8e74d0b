"""A notebook study as one command: its protocol as nested MLflow runs, our best recipe beside it, one report.

    mlflow run . -e study --env-manager local -P name=organamnist-architectures -P budget=quick
    python -m training.cli study --name breast-blood-classical-hybrid --budget full --seeds 0,1,2

The study file is read and checked by ``training.workflows.study.spec`` (every configuration built before the
parent run exists); this module runs each configuration as a nested run of one parent run, and
``training.workflows.study.report`` writes what the parent shows.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import mlflow
from tqdm.auto import tqdm

from training.core.features import RAW
from training.core.options import to_text
from training.tracking import lifecycle, records
from training.workflows.classical import run_classical
from training.workflows.ensemble import EnsembleConfig, run_ensemble
from training.workflows.study.report import log_report
from training.workflows.study.spec import Study, StudyOptions, load_study
from training.workflows.train import run_training


@dataclass
class StudyOutcome:
    run_id: str
    study: Study
    run_ids: dict[tuple[str, int], str]  # (label, seed) -> run id
    report_markdown: str


def run_study(options: StudyOptions, progress: bool = True) -> StudyOutcome:
    """Check the whole study, then run every configuration as a nested run of one parent and report."""
    study = load_study(options)
    for note in sorted({n for c in study.configurations for n in c.notes}):
        print(f"note: {note}", flush=True)
    tags = {"kind": "study", "study": study.name, "budget": study.budget}
    with lifecycle.tracked_run(f"study-{study.name}", tags, experiment=f"study-{study.name}") as parent:
        started = time.perf_counter()
        records.log_new_params(
            {
                "name": study.name,
                "budget": study.budget,
                "seeds": to_text(study.seeds),
                "data_dir": options.data_dir,
                "configurations": len(study.configurations),
                "ours_recipe": study.ours_recipe,
            }
        )
        mlflow.log_artifact(str(study.path), "study")
        run_ids: dict[tuple[str, int], str] = {}
        bar = tqdm(study.configurations, desc=f"study {study.name}", unit="run", disable=not progress)
        for config in bar:
            bar.set_postfix_str(f"{config.label} seed {config.seed}")
            child_tags = {"study": study.name, "study_config": config.label, "study_seed": str(config.seed)}
            if config.notes:
                child_tags[records.NOTES_TAG] = "; ".join(config.notes)
            if config.kind == "train":
                outcome = run_training(config.train, nested=True, progress=False, extra_tags=child_tags)
            elif config.kind == "classical":
                features = run_ids[(config.features_from, config.seed)] if config.features_from != RAW else RAW
                outcome = run_classical(replace(config.classical, features=features), nested=True, tags=child_tags)
            else:
                members = [run_ids[(m, config.seed)] for m in config.members]
                ensemble = EnsembleConfig(runs=members, weights=config.weights, data_dir=options.data_dir)
                outcome = run_ensemble(ensemble, nested=True, tags=child_tags)
            run_ids[(config.label, config.seed)] = outcome.run_id
        report = log_report(study, run_ids)
        mlflow.log_metric("wall_time", time.perf_counter() - started)
        return StudyOutcome(parent.info.run_id, study, run_ids, report)
