"""The model card: ``README.md`` in a pipeline (or checkpoint) directory, in the Hugging Face Hub's format.

YAML front matter (``library_name``, ``license``, ``tags``, ``datasets``, the data and periods, and the
validation scores as the Hub's ``model-index``), then a body: data and periods, licence, intended use
and limits, the validation table from ``signal-worker evaluate``'s ``report.json``, and the exact
command that trained the weights.

Every input is plain data (strings, numbers, tuples, the evaluation report as parsed JSON), so the
training code can write the card without importing the model. ``card_inputs_from_spec`` fills the
inputs from a ``feature_spec.json`` or v1 ``manifest.json`` (they share these keys).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from schemas.timeframe import format_duration
from worker.data import fx as _fx
from worker.features.candles import iso

CARD_FILE = "README.md"
# The directory is in diffusers' layout, but its classes live in this package: naming diffusers as
# the library would make the Hub offer a loading snippet (DiffusionPipeline.from_pretrained) that
# cannot work on its own. ``diffusers`` is a tag instead.
LIBRARY_NAME = "sssd-signal-worker"
BASE_TAGS = ("diffusers", "time-series-forecasting", "probabilistic-forecasting", "diffusion", "sssd", "s4d", "fx")
PIPELINE_TAG = "time-series-forecasting"
# Bars from this date on are reserved for independent evaluation: no training or tuning reads them.
# One source: the data loader's cut.
RESERVED_FROM = iso(_fx.RESERVED_FROM)[:10]

DEFAULT_INTENDED_USE = (
    "Probabilistic forecasts (quantiles, mean, P(up)) of the log return from the last closed bar's close "
    "to each trained horizon, for the symbol and bar timeframe the model was trained on, served by "
    "sssd-signal-worker's Forecaster or SSSDForecastPipeline.",
    "Research on diffusion samplers and calibration of return distributions.",
)
DEFAULT_LIMITATIONS = (
    "Trained on the data and periods listed above only; other symbols, timeframes or market regimes are "
    "out of distribution (the worker refuses another timeframe unless told otherwise).",
    "The validation period also served for early stopping and model selection: its scores are validation "
    "scores, not an untouched test.",
    "Forecasts describe returns before costs, spread and slippage; they are not trading advice and carry "
    "no guarantee. A forecast needs a full window of history; too gappy a window is refused.",
    f"Bars from {RESERVED_FROM} on are reserved for independent evaluation and were never read.",
)


@dataclass(frozen=True)
class DataSource:
    name: str  # file or dataset name
    licence: str
    sha256: str
    rows: int
    train_period: tuple[str, str]
    validation_period: tuple[str, str]


@dataclass(frozen=True)
class ModelCardInputs:
    model_version: str
    licence: str  # the weights' licence, an SPDX id as the Hub expects ("apache-2.0")
    timeframe: str  # "1h", "5m"
    horizons: tuple[str, ...]
    data: tuple[DataSource, ...]
    training_command: str  # exactly as run
    validation_report: Mapping[str, Any] | None = None  # evaluate's report.json, parsed
    evaluation_command: str | None = None
    intended_use: tuple[str, ...] = DEFAULT_INTENDED_USE
    limitations: tuple[str, ...] = DEFAULT_LIMITATIONS
    tags: tuple[str, ...] = field(default_factory=tuple)  # beside BASE_TAGS
    calibration: Mapping[str, float] | None = None  # spread factor per horizon (key: horizon in ms)
    calibration_sampler: str | None = None  # the sampler setting they were fitted for ("unipc 5 steps")
    calibration_command: str | None = None  # exactly as run, when the calibration was refitted after training


def card_inputs_from_spec(spec: Mapping[str, Any], *, licence: str, data_licence: str, training_command: str,
                          validation_report: Mapping[str, Any] | None = None,
                          evaluation_command: str | None = None,
                          calibration_command: str | None = None) -> ModelCardInputs:
    """Inputs from a parsed ``feature_spec.json`` / ``manifest.json``."""
    f, d = spec["features"], spec["data"]
    calibration = spec.get("calibration")
    sampler = None
    if calibration:
        setting = spec.get("calibration_sampler")
        if setting is None:  # not written when it is the default one (the checkpoint's own rule)
            from worker.model.checkpoint import LEGACY_CALIBRATION_SAMPLER

            setting = LEGACY_CALIBRATION_SAMPLER.model_dump()
        sampler = f"{setting['scheduler']} {setting['steps']} steps"
    return ModelCardInputs(
        model_version=spec["model_version"],
        licence=licence,
        timeframe=format_duration(int(f["timeframe_ms"])),
        horizons=tuple(format_duration(int(h)) for h in f["horizons_ms"]),
        data=(DataSource(name=d["source"], licence=data_licence, sha256=d["sha256"], rows=int(d["rows"]),
                         train_period=(d["train_period"][0], d["train_period"][1]),
                         validation_period=(d["validation_period"][0], d["validation_period"][1])),),
        training_command=training_command,
        validation_report=validation_report,
        evaluation_command=evaluation_command,
        calibration=calibration,
        calibration_sampler=sampler,
        calibration_command=calibration_command,
    )


def _validation_rows(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for label, entry in report["horizons"].items():
        # evaluate's one-series report compares with EWMA-Normal; the five-pair report with the seasonal EWMA.
        baseline = "ewma_normal" if "ewma_normal" in entry else "seasonal_ewma"
        model, ewma = entry["model"], entry[baseline]
        rows.append({
            "horizon": label, "baseline": "EWMA-Normal" if baseline == "ewma_normal" else "seasonal EWMA",
            "n": entry["n"], "crps": model["crps"], "crps_ewma": ewma["crps"],
            "ratio": model["crps"] / ewma["crps"], "cov50": model["coverage"]["50"],
            "cov80": model["coverage"]["80"], "cov90": model["coverage"]["90"],
            "ks_p": model.get("calibration", {}).get("ks_pvalue", float("nan")),
        })
    return rows


def _metadata(inputs: ModelCardInputs) -> ModelCardData:
    report = inputs.validation_report
    evals = None
    if report is not None:
        name = inputs.data[0].name if inputs.data else "validation"
        evals = []
        for row in _validation_rows(report):
            ratio_type = "crps_vs_" + row["baseline"].lower().replace(" ", "_").replace("-", "_")
            for metric, value, title in (("crps", row["crps"], "CRPS"), ("coverage_90", row["cov90"], "90% coverage"),
                                         (ratio_type, row["ratio"], f"CRPS / {row['baseline']} CRPS")):
                evals.append(EvalResult(
                    task_type=PIPELINE_TAG, task_name="Probabilistic forecasting", dataset_type=name,
                    dataset_name=f"{name} (validation {report['period'][0]} .. {report['period'][1]})",
                    dataset_split="validation", metric_type=metric, metric_value=float(value),
                    metric_name=f"{title} {row['horizon']}",
                ))
    # Kept in the metadata so a rewrite keeps it; left out when there is none (a card as before).
    extra: dict[str, Any] = {"calibration_command": inputs.calibration_command} if inputs.calibration_command else {}
    return ModelCardData(
        library_name=LIBRARY_NAME,
        license=inputs.licence,
        tags=list(dict.fromkeys((*BASE_TAGS, *inputs.tags))),
        pipeline_tag=PIPELINE_TAG,
        datasets=[d.name for d in inputs.data],
        model_name=inputs.model_version,
        eval_results=evals,
        model_version=inputs.model_version,
        timeframe=inputs.timeframe,
        horizons=list(inputs.horizons),
        training_data=[{"source": d.name, "licence": d.licence, "sha256": d.sha256, "rows": d.rows,
                        "train_period": list(d.train_period), "validation_period": list(d.validation_period)}
                       for d in inputs.data],
        reserved_for_evaluation_from=RESERVED_FROM,
        training_command=inputs.training_command,  # kept in the metadata so a rewrite keeps it
        **extra,
    )


def render_model_card(inputs: ModelCardInputs) -> str:
    report = inputs.validation_report
    if report is not None and report.get("model_version") != inputs.model_version:
        raise ValueError(f"the validation report is for {report.get('model_version')!r}, not "
                         f"{inputs.model_version!r}: a card must not show another model's scores")
    if not inputs.training_command.strip():
        raise ValueError("training_command is required: the card says how the weights were made")
    lines = [f"# {inputs.model_version}", "",
             f"SSSD (S4D state-space diffusion) forecaster of {inputs.timeframe} bars, horizons "
             f"{', '.join(inputs.horizons)}, in diffusers' directory layout: load it with "
             f"`worker.model.pipeline.SSSDForecastPipeline.from_pretrained(DIR)`.", "",
             "## Data and periods", "",
             "| source | licence | rows | training period | validation period | sha256 |",
             "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {d.name} | {d.licence} | {d.rows} | {d.train_period[0]} .. {d.train_period[1]} | "
              f"{d.validation_period[0]} .. {d.validation_period[1]} | `{d.sha256}` |" for d in inputs.data]
    lines += ["", f"Bars from {RESERVED_FROM} on are reserved for independent evaluation.", "",
              "## Licence", "", f"The weights: `{inputs.licence}`. Training data: "
              + "; ".join(f"{d.name}: {d.licence}" for d in inputs.data) + ".", "",
              "## Intended use", ""]
    lines += [f"- {item}" for item in inputs.intended_use]
    lines += ["", "## Limits", ""]
    lines += [f"- {item}" for item in inputs.limitations]
    lines += ["", "## Validation", ""]
    if report is None:
        lines += ["No validation report was supplied for these weights."]
    else:
        rows = _validation_rows(report)
        baseline = rows[0]["baseline"] if rows else "EWMA-Normal"
        lines += [f"`signal-worker evaluate` over {report['period'][0]} .. {report['period'][1]}: "
                  f"{report['forecasts']} forecasts, scheduler {report['scheduler']}, {report['steps']} steps, "
                  f"{report['samples']} samples, seed {report['seed']}"
                  + (f", on {report['machine']['date']}" if "machine" in report else "") + ".", "",
                  f"| horizon | n | CRPS | CRPS {baseline} | CRPS / EWMA | coverage 50 % | coverage 80 % | "
                  "coverage 90 % | PIT KS p |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {r['horizon']} | {r['n']} | {r['crps']:.4e} | {r['crps_ewma']:.4e} | {r['ratio']:.3f} | "
                  f"{r['cov50']:.1%} | {r['cov80']:.1%} | {r['cov90']:.1%} | {r['ks_p']:.3f} |"
                  for r in rows]
        if inputs.evaluation_command:
            lines += ["", "Reproduce:", "", "```bash", inputs.evaluation_command, "```"]
    if inputs.calibration:
        factors = ", ".join(f"{format_duration(int(h))} {factor:g}" for h, factor in sorted(
            inputs.calibration.items(), key=lambda kv: int(kv[0])))
        lines += ["", "## Calibration", "",
                  f"Spread factors fitted on the validation period for sampling with {inputs.calibration_sampler}: "
                  f"{factors} (each horizon's samples are widened about their mean by its factor). Served with "
                  "another sampler or step count, the forecasts keep these factors and the worker logs "
                  "`calibration_fitted_for_another_sampler`."]
        if inputs.calibration_command:
            lines += ["", "Refitted after training with:", "", "```bash", inputs.calibration_command, "```"]
    lines += ["", "## Training command", "", "The exact command that produced these weights:", "",
              "```bash", inputs.training_command, "```", ""]
    return f"---\n{_metadata(inputs).to_yaml()}\n---\n\n" + "\n".join(lines)


def write_model_card(directory: str | Path, inputs: ModelCardInputs) -> Path:
    """Write ``README.md`` into ``directory``; returns its path."""
    path = Path(directory) / CARD_FILE
    card = ModelCard(render_model_card(inputs))  # parses the front matter: a malformed card fails here
    card.save(path)
    return path


def rewrite_model_card(directory: str | Path, validation_report: Mapping[str, Any], *,
                       evaluation_command: str) -> Path:
    """(Re)write the card of a pipeline directory with ``evaluate``'s report as its validation table,
    keeping the training command and data licences of the card already there (if any)."""
    root = Path(directory)
    spec = json.loads((root / "feature_spec.json").read_text())
    try:
        old = read_model_card_metadata(root / CARD_FILE)
    except FileNotFoundError:
        old = {}
    licences = [d.get("licence") for d in old.get("training_data", []) if isinstance(d, dict)]
    inputs = card_inputs_from_spec(
        spec, licence=str(old.get("license", "apache-2.0")),
        data_licence=str(licences[0]) if licences else "unknown: add the data's licence",
        training_command=str(old.get("training_command", "(not recorded)")),
        validation_report=validation_report, evaluation_command=evaluation_command,
        calibration_command=old.get("calibration_command"))
    return write_model_card(root, inputs)


def read_model_card_metadata(path: str | Path) -> dict[str, Any]:
    """The YAML front matter of a local card (never fetched)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no model card")
    data: dict[str, Any] = ModelCard(p.read_text()).data.to_dict()
    return data


__all__ = [
    "CARD_FILE",
    "DataSource",
    "ModelCardInputs",
    "card_inputs_from_spec",
    "read_model_card_metadata",
    "render_model_card",
    "rewrite_model_card",
    "write_model_card",
]
