"""``members=N``: N networks of one configuration, each with its own seed, averaged into one ensemble model.

    python -m training.cli train --recipe quick --dataset breastmnist --members 3
    mlflow run . -e train --env-manager local -P recipe=quick -P members=3

One parent run (the one `mlflow run` made, or a new one) holds N nested member runs, each a complete training
run (checkpoints, model, figures, its own test score), and then logs the equal-weight average of their class
probabilities as one ONNX graph (``training.workflows.ensemble``): the members of one configuration differ only in their
seed, so no weight is fitted on the validation split. Member i of seed s trains with seed s * N + i, so the
ensembles of different seeds share no network. A stopped parent goes on with ``resume=<parent id>``: finished
members are kept, a stopped member continues from its checkpoint, the others are trained.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import mlflow

from training.core.config import ResolvedConfig, TrainConfig, resolve
from training.tracking import lifecycle, records
from training.tracking.resume import ResumeError, resumption
from training.workflows.ensemble import EnsembleOutcome, log_ensemble, members_of
from training.workflows.network import train_network

MEMBER_OF_TAG = "medzoo.member_of"
MEMBER_TAG = "medzoo.member"


@dataclass
class MembersOutcome:
    run_id: str
    member_run_ids: list[str]
    ensemble: EnsembleOutcome

    @property
    def val_metrics(self) -> dict[str, float]:
        return self.ensemble.val_metrics

    @property
    def test_metrics(self) -> dict[str, float]:
        return self.ensemble.test_metrics

    def summary(self) -> str:
        val, test = self.ensemble.val_metrics, self.ensemble.test_metrics
        members = ", ".join(f"{acc:.4f}" for acc in self.ensemble.member_test_acc)
        return (
            f"run {self.run_id}: ensemble of {len(self.member_run_ids)} members, val acc {val['best_val_acc']:.4f}, "
            f"test acc {test['test_acc']:.4f}, test auc {test['test_auc']:.4f} (members' test acc {members})"
        )


def member_seed(seed: int, members: int, index: int) -> int:
    return seed * members + index


def member_configs(config: TrainConfig) -> list[TrainConfig]:
    return [
        dataclasses.replace(config, members=1, seed=member_seed(config.seed, config.members, i))
        for i in range(config.members)
    ]


def train_members(
    run: ResolvedConfig,
    *,
    nested: bool = False,
    extra_tags: dict | None = None,
    progress: bool = True,
    resume_run_id: str | None = None,
) -> MembersOutcome:
    """Train (or, resuming, finish) the members one after the other, then log their ensemble in the parent."""
    config = run.config
    tags = {
        "model": "ensemble",
        "member_model": config.model,
        "dataset": config.dataset,
        "kind": "ensemble",
        "recipe": config.recipe,
        **(extra_tags or {}),
    }
    run_name = f"{config.model}-x{config.members}-{config.dataset}"
    with lifecycle.tracked_run(
        run_name, tags, nested=nested, experiment=config.dataset, run_id=resume_run_id
    ) as parent:
        started = time.perf_counter()
        records.log_new_params(config.to_params())
        earlier = _latest_member_runs(parent.info.run_id) if resume_run_id else {}
        member_ids = []
        for index, member in enumerate(member_configs(config)):
            previous = earlier.get(index)
            if previous is not None and previous.info.status == "FINISHED":
                member_ids.append(previous.info.run_id)
                continue
            state = None
            if previous is not None:
                try:
                    _, state = resumption(previous.info.run_id)
                except ResumeError:  # stopped before its first checkpoint: nothing to go on from
                    state = None
            print(f"== member {index + 1} of {config.members} (seed {member.seed})", flush=True)
            outcome = train_network(
                resolve(member),
                nested=True,
                progress=progress,
                extra_tags={MEMBER_OF_TAG: parent.info.run_id, MEMBER_TAG: str(index)},
                resume=state,
            )
            member_ids.append(outcome.run_id)
        equal = [1.0 / len(member_ids)] * len(member_ids)
        ensemble = log_ensemble(members_of(member_ids), equal, config.data_path, parent.info.run_id)
        mlflow.log_metric("wall_time", time.perf_counter() - started)
        return MembersOutcome(parent.info.run_id, member_ids, ensemble)


def _latest_member_runs(parent_id: str) -> dict[int, mlflow.entities.Run]:
    """The newest run of each member index under ``parent_id``."""
    found = mlflow.search_runs(
        search_all_experiments=True,
        output_format="list",
        filter_string=f"tags.`{MEMBER_OF_TAG}` = '{parent_id}'",
        order_by=["attributes.start_time ASC"],
    )
    return {int(run.data.tags[MEMBER_TAG]): run for run in found}
