"""The ``usam`` command line: parse, build settings, dispatch; errors become one clear line."""

from __future__ import annotations

import argparse
import ipaddress
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from usam_backend.core.errors import ConfigurationError, UsamError
from usam_backend.core.settings import SAM_TYPES, Settings, get_settings


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.command(args))
    except UsamError as exc:
        print(f"usam: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("usam: interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="usam",
        description="Segment Anything that knows your labels: train a head from class images, then label images.",
        epilog="Settings come from USAM_* environment variables (see README); flags override them.",
    )
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")

    train = commands.add_parser(
        "train",
        help="train a head from DIR/<class name>/*.jpg images",
        description="Embed every image of DIR/<class name>/ with SAM (cached), train a MIL teacher and a "
        "distilled student, report validation accuracy, and save the head. DIR/_background/ may hold negative "
        "images that show none of the classes.",
    )
    train.add_argument("--data", type=Path, required=True, metavar="DIR", help="folder of class folders")
    train.add_argument("--out", type=Path, required=True, metavar="HEAD_PATH", help="where to save the head (.pt)")
    train.add_argument("--epochs", type=int, help="epochs for teacher and student (default 40)")
    train.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    train.add_argument("--no-distill", action="store_true", help="keep the MIL teacher, skip the student")
    train.add_argument("--val-fraction", type=float, default=0.2, help="held-out share per class (default 0.2)")
    train.add_argument("--no-cache", action="store_true", help="do not read or write cached embeddings")
    _model_flags(train)
    train.set_defaults(command=_train)

    predict = commands.add_parser(
        "predict",
        help="label images with a trained head",
        description="For each IMAGE write NAME.labels.png (pixel value = class index + 1, 0 = background, "
        "coloured palette), NAME.json (regions with label, score, box, COCO RLE mask) and with --viz "
        "NAME.overlay.png.",
    )
    predict.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    predict.add_argument("--head", type=Path, required=True, metavar="HEAD_PATH")
    predict.add_argument("--out", type=Path, required=True, metavar="DIR")
    predict.add_argument("--viz", action="store_true", help="also write an overlay picture per image")
    predict.add_argument("--threshold", type=float, help="score threshold (USAM_SCORE_THRESHOLD)")
    predict.add_argument("--nms-iou", type=float, help="mask NMS IoU (USAM_NMS_IOU)")
    _model_flags(predict)
    predict.set_defaults(command=_predict)

    bench = commands.add_parser(
        "bench",
        help="time our inference path against the naive one",
        description="Per-stage times and peak memory of our path and of the naive path (SAM decodes and "
        "upscales masks for every point, then classifies) on one synthetic image, and whether both give the "
        "same regions. Uses random weights when no checkpoint is on disk: timings are real either way.",
    )
    bench.add_argument("--size", type=int, default=1024, help="image side in pixels (default 1024)")
    bench.add_argument("--keep", type=float, default=0.25, help="share of grid points over the threshold")
    bench.add_argument("--chunk", type=int, help="points decoded per batch (USAM_DECODE_CHUNK)")
    bench.add_argument("--json", type=Path, metavar="PATH", help="also write the numbers as JSON")
    _model_flags(bench)
    bench.set_defaults(command=_bench)

    latency = commands.add_parser(
        "bench-predict",
        help="time /predict over HTTP: first call and cached image",
        description="Start the backend on loopback with a random head (and random SAM weights when no checkpoint "
        "is on disk), then time /predict for one image: the first call, and again with its embedding cached.",
    )
    latency.add_argument("--size", type=int, default=1024, help="image side in pixels (default 1024)")
    latency.add_argument("--repeat", type=int, default=3, help="cached calls to time (default 3)")
    latency.add_argument(
        "--keep", type=float, help="share of grid points over the threshold (default 0.25; 1.0 with --megapixels)"
    )
    latency.add_argument(
        "--megapixels",
        type=lambda v: tuple(float(x) for x in v.split(",")),
        metavar="LIST",
        help="instead: peak memory and seconds of one /predict per image size, e.g. 1,12,48",
    )
    _model_flags(latency)
    latency.set_defaults(command=_bench_predict)

    refine = commands.add_parser(
        "refine",
        help="refine coarse label maps with SAM (UO-SAM)",
        description="For every image of DIR with a coarse label-map PNG of the same stem in MASKS: SAM refines each "
        "region of the map (local optimizer) and then repaints SAM's automatic masks with the majority class beneath "
        "them (global optimizer). Refined maps keep the coarse maps' format (palette or grey); maps already in OUTDIR "
        "are skipped, so a stopped run resumes. Pixels of value 255 are left alone.",
    )
    refine.add_argument("--data", type=Path, metavar="DIR", help="images")
    refine.add_argument("--mask", type=Path, metavar="MASKS", help="coarse label-map PNGs")
    refine.add_argument("--outdir", type=Path, metavar="OUTDIR", help="where refined maps go")
    refine.add_argument("--project", help="instead: refine a Label Studio project's predictions (with --from-version)")
    refine.add_argument(
        "--from-version",
        metavar="V",
        help="the model_version whose predictions to refine; the refined ones are posted as V+uosam",
    )
    refine.add_argument("--no-wait", action="store_true", help="with --project and REDIS_URL: queue and return")
    refine.add_argument("--no-global", action="store_true", help="local optimizer only (much faster on CPU)")
    refine.add_argument(
        "--global-points", type=int, metavar="N",
        help="automatic-mask points per side for the global step (default: 16 on CPU, the paper's 64 on CUDA)",
    )  # fmt: skip
    refine.add_argument(
        "--crop-layers", type=int, metavar="N",
        help="automatic-mask crop layers for the global step (default: 0 on CPU, the paper's 1 on CUDA)",
    )  # fmt: skip
    refine.add_argument("--accept-iou", type=float, default=0.4, help="replace a region if SAM agrees this much")
    refine.add_argument("--viz", action="store_true", help="also write OUTDIR/viz/<stem>.png: image | coarse | refined")
    refine.add_argument("--overwrite", action="store_true", help="refine maps already in OUTDIR again")
    refine.add_argument("--sam-type", dest="sam", choices=SAM_TYPES, help=argparse.SUPPRESS)
    _model_flags(refine)
    refine.set_defaults(command=_refine)

    video = commands.add_parser(
        "video",
        help="video objects: tracks from a head or a tracks file, masks per frame (UVOSAM)",
        description="Segment a video (mp4/webm/mov, or a folder of frames) into objects that keep their id: "
        "with --head, in one pass, each frame is shown to SAM once, the head finds its classes on every "
        "--stride-th frame and SAM follows each object through every frame; with --tracks, the boxes come from a "
        "tracks file (UVOSAM JSON, usam tracks.json, MOT text) and prompt SAM on each frame; with --box, each "
        "object given on one frame is followed through the clip. Writes DIR/<frame>.png (palette PNG of track "
        "ids), DIR/tracks.json and with --viz DIR/viz.mp4. Resumes a stopped run.",
    )
    video.add_argument("input", type=Path, metavar="INPUT", help="a video file or a folder of frames")
    video.add_argument("--out", type=Path, required=True, metavar="DIR")
    source = video.add_mutually_exclusive_group(required=True)
    source.add_argument("--head", type=Path, metavar="HEAD_PATH", help="find the head's classes")
    source.add_argument("--tracks", type=Path, metavar="FILE", help="boxes from a tracks file")
    follow = "an object on one frame (0-based, pixels), followed through the clip; repeatable"
    source.add_argument("--box", action="append", metavar="FRAME:X0,Y0,X1,Y1[:LABEL]", help=follow)
    video.add_argument("--video-id", help="which video of a multi-video UVOSAM tracks file (default: INPUT's name)")
    video.add_argument("--stride", type=int, help="run the head on every N-th frame (USAM_VIDEO_STRIDE)")
    video.add_argument("--fps", type=float, help="frame rate of a frame folder (default 24)")
    video.add_argument("--viz", nargs="?", const="mp4", choices=["mp4", "gif"], help="also write DIR/viz.mp4 (or .gif)")
    video.add_argument("--overwrite", action="store_true", help="start again instead of resuming")
    _model_flags(video)
    video.set_defaults(command=_video)

    evaluate = commands.add_parser(
        "eval",
        help="evaluate predictions against ground truth",
        description="usam eval masks: per-class IoU, mIoU and pixel accuracy of label-map PNGs against ground-truth "
        "PNGs of the same stem (and with --baseline, the change per class), as a table and JSON. "
        "usam eval video: DAVIS-2017 unsupervised J&F of per-frame object-id PNGs (a folder per sequence, "
        "or one sequence's folder), predicted objects matched to true ones by the Hungarian algorithm.",
    )
    evaluate.add_argument("what", choices=["masks", "video"], help="what to evaluate")
    evaluate.add_argument("--pred", type=Path, required=True, metavar="DIR")
    evaluate.add_argument("--gt", type=Path, required=True, metavar="DIR")
    evaluate.add_argument("--baseline", type=Path, metavar="DIR", help="e.g. the coarse maps before refinement")
    evaluate.add_argument("--ignore", type=int, default=255, help="ground-truth value left out (default 255)")
    evaluate.add_argument("--json", type=Path, metavar="PATH", help="also write the numbers as JSON")
    evaluate.set_defaults(command=_evaluate)

    bench_video = commands.add_parser(
        "bench-video",
        help="frames per second of the video paths, stage by stage",
        description="Encode, decode, track and segment a synthetic clip of moving objects: the head on every "
        "--stride-th frame, linked into box tracks (Label Studio video); usam video --head's one pass (masks on "
        "every frame); --box following. Prints seconds per stage, frames per second, the image encoder's passes per "
        "frame and its share of the time. Random weights unless a checkpoint is on disk.",
    )
    bench_video.add_argument("--frames", type=int, default=24, help="frames in the clip (default 24)")
    bench_video.add_argument("--size", type=int, default=640, help="frame width in pixels (4:3; default 640)")
    bench_video.add_argument("--stride", type=int, default=5, help="run the head on every N-th frame (default 5)")
    bench_video.add_argument("--objects", type=int, default=4, help="moving objects (default 4)")
    bench_video.add_argument(
        "--memory", default="", help="also run usam video on clips this long and print its peak memory, e.g. 300,3000"
    )
    _model_flags(bench_video)
    bench_video.set_defaults(command=_bench_video)

    bench_refine = commands.add_parser(
        "bench-refine",
        help="time refinement per image and per object",
        description="Refine a synthetic scene's coarse map with SAM: the local step with and without the image's "
        "embedding cached, and local + global. Random weights when no checkpoint is on disk: timings are real.",
    )
    bench_refine.add_argument("--size", type=int, default=1024, help="image width in pixels (4:3; default 1024)")
    bench_refine.add_argument("--objects", type=int, default=8, help="objects in the scene (default 8)")
    bench_refine.add_argument(
        "--global-points", type=int, metavar="N", help="automatic-mask points per side (default: usam refine's)"
    )
    bench_refine.add_argument(
        "--crop-layers", type=int, metavar="N", help="automatic-mask crop layers (default: usam refine's)"
    )
    _model_flags(bench_refine)
    bench_refine.set_defaults(command=_bench_refine)

    health = commands.add_parser(
        "bench-health",
        help="time /health with many heads on disk and many projects",
        description="Write HEADS random head files and PROJECTS project records into a temporary model folder, "
        "serve it on loopback and time /health: the first call and the median of the next ones.",
    )
    health.add_argument("--heads", type=int, default=1000, help="head files (default 1000)")
    health.add_argument("--projects", type=int, default=100, help="projects (default 100)")
    health.set_defaults(command=_bench_health)

    bench_training = commands.add_parser(
        "bench-training",
        help="how stable head training is over seeds, on real-data bags (needs scikit-learn)",
        description="Bags of handwritten digits (scikit-learn's digits: real features, not SAM's) stand in for "
        "images and their grid points. Teacher and student train once per seed, with the paper's top-k pooling "
        "and with usam's pooling warm-up; prints instance mAP (mean, std, worst) and training seconds.",
    )
    bench_training.add_argument("--seeds", type=int, default=8, help="training seeds (default 8)")
    bench_training.add_argument("--data-seed", type=int, default=0, help="which digits are classes, which bags")
    bench_training.add_argument("--epochs", type=int, help="epochs for teacher and student (default 40)")
    bench_training.set_defaults(command=_bench_training)

    labels = commands.add_parser(
        "train-labels",
        help="run a training job now, in this process, for the given labels",
        description="What the backend queues when a project's labels have no head: class images from "
        "USAM_DATA_SOURCE, SAM embeddings, teacher and student, validation, and an atomic publish into "
        "USAM_MODEL_DIR/heads/. Every stage is cached, so a stopped run resumes; prints the stage timings.",
    )
    labels.add_argument("labels", nargs="+", metavar="LABEL")
    labels.add_argument("--source", choices=["synthetic", "web", "folder"], help="USAM_DATA_SOURCE")
    labels.add_argument("--images", type=int, help="class images per label (USAM_IMAGES_PER_CLASS)")
    _model_flags(labels)
    labels.set_defaults(command=_train_labels)

    pre = commands.add_parser(
        "preannotate",
        help="pre-annotate a whole Label Studio project with jobs that write predictions back",
        description="List the project's tasks through Label Studio's API (LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY), "
        "keep those without a prediction of the current model_version, and predict them in chunks of "
        "USAM_PREANNOTATE_CHUNK tasks: as RQ jobs when REDIS_URL is set (run `usam worker` on as many machines as "
        "you like), else in this process. Each prediction is posted to Label Studio as soon as it is made; run the "
        "command again to resume.",
    )
    pre.add_argument("--project", required=True, help="Label Studio project id")
    pre.add_argument("--chunk", type=int, help="tasks per job (USAM_PREANNOTATE_CHUNK)")
    pre.add_argument("--no-wait", action="store_true", help="queue the jobs and return (with REDIS_URL)")
    pre.add_argument("--timeout", type=float, help="stop waiting after this many seconds")
    pre.set_defaults(command=_preannotate)

    export = commands.add_parser(
        "export",
        help="export a Label Studio project to COCO, YOLO-seg, label maps, MOT, DAVIS and MOTS",
        description="Read a Label Studio project's annotations (or with --from-version its predictions of that "
        "model version) through its API (LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY), fetch its images and videos, "
        "and write DIR/images/, coco.json (RLE masks), the YOLO segmentation layout (data.yaml, classes.txt, "
        "labels/), masks/ (label-map PNGs), and for frame sequences and videos mot/, davis/ and mots/. Files "
        "already written are kept, so a stopped export resumes. See README, Export.",
    )
    export.add_argument("--project", required=True, help="Label Studio project id")
    export.add_argument("--out", type=Path, required=True, metavar="DIR")
    export.add_argument("--from-version", metavar="V", help="export the predictions of this model_version instead")
    export.add_argument("--annotation", default="latest", choices=["latest", "first", "ground-truth"],
                        help="which of a task's annotations wins (default: the latest updated)")  # fmt: skip
    export.add_argument("--format", default="coco,yolo,masks,mot,davis,mots", metavar="LIST",
                        help="comma-separated formats (default: all)")  # fmt: skip
    export.add_argument("--link-iou", type=float, default=0.3, help="frame-sequence regions join a track at this IoU")
    export.add_argument("--overwrite", action="store_true", help="fetch and write every file again (no resume)")
    export.set_defaults(command=_export)

    worker = commands.add_parser(
        "worker",
        help="run an RQ worker for training and pre-annotation jobs (needs REDIS_URL)",
        description="Take training and pre-annotation jobs from the USAM_QUEUE queue on REDIS_URL. The worker runs "
        "jobs in its own process without forking, so CUDA is safe and SAM loads once. Start as many as you like, "
        "on any machine that shares the Redis and USAM_MODEL_DIR.",
    )
    worker.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    worker.set_defaults(command=_worker)

    serve = commands.add_parser(
        "serve",
        help="run the Label Studio ML backend",
        description="Serve Label Studio's ML-backend protocol (/health, /setup, /predict, /webhook, /versions; "
        "OpenAPI at /docs). Configuration comes from the environment (see README).",
    )
    serve.add_argument("--host", default="0.0.0.0", help="address to bind (default 0.0.0.0)")
    serve.add_argument("--port", type=int, default=9090, help="port (default 9090)")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.set_defaults(command=_serve)
    return parser


def _model_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model (override USAM_* settings)")
    group.add_argument("--sam", choices=SAM_TYPES, help="SAM type (USAM_SAM_TYPE)")
    group.add_argument("--checkpoint", type=Path, help="SAM checkpoint path (USAM_SAM_CHECKPOINT)")
    group.add_argument("--device", help="auto, cpu, cuda, cuda:N (USAM_DEVICE)")
    group.add_argument("--points", type=int, help="grid points per image, a perfect square (USAM_POINTS)")


def _settings(args: argparse.Namespace, **extra: Any) -> Settings:
    return get_settings().replace(
        sam_type=args.sam, sam_checkpoint=args.checkpoint, device=args.device, points=args.points, **extra
    )


def _train(args: argparse.Namespace) -> int:
    from training.pipeline import train_from_folders  # torch: loaded only by the commands that need it

    settings = _settings(args)
    options = {} if args.epochs is None else {"epochs": args.epochs}
    result = train_from_folders(
        settings, args.data, args.out, seed=args.seed, distill=not args.no_distill,
        val_fraction=args.val_fraction, cache=not args.no_cache, **options,
    )  # fmt: skip
    for path, reason in result.skipped:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    print(_metrics_table(result.metrics))
    head = result.head
    random_note = " (random SAM weights: for testing only)" if head.info.get("random_weights") else ""
    print(f"saved head {head.version} ({', '.join(head.class_names)}) to {result.path}{random_note}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from training.head import Head
    from usam_backend.core.images import load_image
    from usam_backend.sam.engine import SamEngine
    from usam_backend.systems.usam import SemanticSegmenter
    from usam_backend.tools.outputs import check_distinct_outputs, write_outputs

    settings = _settings(args, score_threshold=args.threshold, nms_iou=args.nms_iou)
    check_distinct_outputs(args.images, args.out)
    head = Head.load(args.head)
    if args.sam is None and head.sam_type and head.sam_type != settings.sam_type:
        settings = settings.replace(sam_type=head.sam_type)  # follow the head unless told otherwise
    engine = SamEngine.from_settings(settings)
    segmenter = SemanticSegmenter.from_settings(engine, head, settings)
    failures = 0
    for image_path in args.images:
        try:
            image = load_image(image_path, max_pixels=settings.max_image_pixels)
        except UsamError as exc:
            print(f"usam: error: {exc}", file=sys.stderr)
            failures += 1
            continue
        regions = segmenter.segment(image)
        write_outputs(image_path, image, regions, segmenter, args.out, viz=args.viz)
        found = ", ".join(f"{label} {score:.2f}" for label, score in zip(regions.labels, regions.scores, strict=True))
        print(f"{image_path}: {len(regions)} region(s){': ' + found if found else ''}")
    if failures:
        print(f"usam: {failures} of {len(args.images)} image(s) failed", file=sys.stderr)
    return 1 if failures else 0


def _bench(args: argparse.Namespace) -> int:
    from usam_backend.tools.bench import format_report, run_bench

    settings = _settings(args, decode_chunk=args.chunk)
    report = run_bench(settings, size=args.size, keep_fraction=args.keep)
    print(format_report(report))
    if args.json:
        args.json.write_text(json.dumps(report.to_dict(), indent=1))
    return 0


def _bench_predict(args: argparse.Namespace) -> int:
    from usam_backend.tools.bench_predict import memory_report, run_memory_bench, run_predict_latency

    if args.megapixels:
        keep = 1.0 if args.keep is None else args.keep
        print(memory_report(run_memory_bench(_settings(args), megapixels=args.megapixels, keep=keep)))
        return 0
    keep = 0.25 if args.keep is None else args.keep
    print(run_predict_latency(_settings(args), size=args.size, repeat=args.repeat, keep=keep).report())
    return 0


def _refine(args: argparse.Namespace) -> int:
    if args.project:
        from usam_backend.jobs.refine import run_refine_project

        if not args.from_version:
            raise ConfigurationError("usam refine --project needs --from-version: the predictions to refine")
        settings = _settings(args)
        return run_refine_project(settings, args.project, args.from_version, use_global=not args.no_global,
                                  wait=not args.no_wait)  # fmt: skip
    if not (args.data and args.mask and args.outdir):
        raise ConfigurationError("usam refine needs --data, --mask and --outdir (or --project and --from-version)")
    from usam_backend.sam.engine import SamEngine
    from usam_backend.sam.generator import AutomaticMasks
    from usam_backend.sam.predictor import EnginePredictor
    from usam_backend.systems.uosam import generator_options
    from usam_backend.tools.refine_files import refine_folder

    settings = _settings(args)
    engine = SamEngine.from_settings(settings)
    generator = None
    if not args.no_global:
        options = generator_options(
            engine.device.type, points_per_side=args.global_points, crop_layers=args.crop_layers
        )
        generator = AutomaticMasks(engine, **options)
    run = refine_folder(
        args.data, args.mask, args.outdir, EnginePredictor(engine), generator=generator,
        max_pixels=settings.max_image_pixels, viz=args.viz, overwrite=args.overwrite, accept_iou=args.accept_iou,
    )  # fmt: skip
    for path, why in run.problems:
        print(f"skipped {path}: {why}", file=sys.stderr)
    print(
        f"refined {len(run.refined)} map(s) into {args.outdir} ({run.accepted_regions} of {run.regions} regions "
        f"replaced by SAM's), {len(run.already_done)} already there, {len(run.problems)} skipped"
    )
    return 1 if run.problems else 0


def _video(args: argparse.Namespace) -> int:
    from usam_backend.tools.video_files import video_command

    settings = _settings(args, video_stride=args.stride)
    run = video_command(settings, args.input, args.out, head=args.head, tracks=args.tracks, boxes=args.box,
                        video_id=args.video_id,
                        fps=args.fps, viz=args.viz, overwrite=args.overwrite)  # fmt: skip
    labels = ", ".join(f"{tid} {t.label}".strip() for tid, t in sorted(run.tracks.items())[:10])
    print(
        f"{len(run.tracks)} track(s){': ' + labels if labels else ''}; {run.frames_segmented} frame(s) segmented, "
        f"{run.frames_reused} already there; wrote {', '.join(str(p) for p in run.outputs)}"
    )
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    if args.what == "video":
        from usam_backend.tools.eval_video import evaluate_folders as evaluate_video
        from usam_backend.tools.eval_video import write_report

        report = evaluate_video(args.pred, args.gt)
        print(report.table())
        if args.json:
            write_report(report, args.json)
        return 0
    from usam_backend.tools.refine_files import evaluate_folders, format_evaluation, to_json

    result = evaluate_folders(args.pred, args.gt, baseline=args.baseline, ignore=args.ignore)
    print(format_evaluation(result))
    if args.json:
        args.json.write_text(to_json(result))
    return 0


def _bench_video(args: argparse.Namespace) -> int:
    from usam_backend.tools.bench_video import run_video_bench

    memory = [int(n) for n in args.memory.split(",") if n.strip()]
    report = run_video_bench(_settings(args), frames=args.frames, size=args.size, stride=args.stride,
                             objects=args.objects, memory_frames=memory)  # fmt: skip
    print(report)
    return 0


def _bench_refine(args: argparse.Namespace) -> int:
    from usam_backend.tools.bench_refine import run_refine_bench

    print(run_refine_bench(_settings(args), size=args.size, objects=args.objects, global_points=args.global_points,
                           crop_layers=args.crop_layers))  # fmt: skip
    return 0


def _bench_health(args: argparse.Namespace) -> int:
    from usam_backend.tools.bench_health import run_health_bench

    print(run_health_bench(heads=args.heads, projects=args.projects))
    return 0


def _bench_training(args: argparse.Namespace) -> int:
    from usam_backend.tools.bench_training import run_training_bench

    if args.seeds < 2 or (args.epochs is not None and args.epochs < 1):
        raise ConfigurationError("usam bench-training needs --seeds of at least 2 and --epochs of at least 1")
    print(run_training_bench(seeds=args.seeds, data_seed=args.data_seed, epochs=args.epochs))
    return 0


def _train_labels(args: argparse.Namespace) -> int:
    from usam_backend.jobs.policy import labels_job, recipe_for
    from usam_backend.jobs.runners import run_function

    settings = _settings(args, data_source=args.source, images_per_class=args.images)
    spec = labels_job(recipe_for(settings), list(args.labels), project=None, trigger="command line")
    result = run_function(spec.function, settings, spec.request, None)
    for stage, seconds in result["stage_seconds"].items():
        print(f"{stage:<26}{seconds:>9.2f} s")
    print(f"{'total':<26}{sum(result['stage_seconds'].values()):>9.2f} s")
    print(f"published {result['version']} as {settings.model_dir / 'heads' / result['file']}")
    return 0


def _preannotate(args: argparse.Namespace) -> int:
    from usam_backend.jobs.preannotate import run_preannotate

    settings = get_settings().replace(preannotate_chunk=args.chunk)
    return run_preannotate(settings, args.project, wait=not args.no_wait, timeout=args.timeout)


def _export(args: argparse.Namespace) -> int:
    from usam_backend.tools.export import ExportOptions, run_export

    formats = tuple(f.strip() for f in args.format.split(",") if f.strip())
    options = ExportOptions(args.project, args.out, formats, args.from_version, args.annotation, args.link_iou,
                            overwrite=args.overwrite)  # fmt: skip
    report = run_export(get_settings(), options)
    print(report.summary())
    return 1 if report.errors or not report.exported else 0


def _worker(args: argparse.Namespace) -> int:
    import logging

    from redis import Redis
    from redis.exceptions import RedisError
    from rq import Queue, SimpleWorker

    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # its INFO lines hold whole URLs, presigned ones too
    settings = get_settings()
    if not settings.redis_url:
        raise ConfigurationError("usam worker needs REDIS_URL; without it, `usam serve` trains in its own process")
    connection = Redis.from_url(settings.redis_url)
    try:
        connection.ping()
    except RedisError as exc:
        raise ConfigurationError(f"cannot reach Redis at REDIS_URL: {exc}") from None
    worker = SimpleWorker([Queue(settings.queue, connection=connection)], connection=connection)
    print(f"usam: worker {worker.name} on queue {settings.queue}")
    worker.work(burst=args.burst, logging_level="INFO")
    return 0


def _serve(args: argparse.Namespace) -> int:
    import logging

    import uvicorn

    from usam_backend.server.app import create_app
    from usam_backend.server.service import Backend

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = get_settings()
    backend = Backend(settings)
    backend.warm_up()
    print(f"usam: serving SAM {settings.sam_type} heads from {settings.model_dir / 'heads'} on {args.host}:{args.port}")
    app = create_app(backend, loopback_only=_is_loopback(args.host))
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def _is_loopback(host: str) -> bool:
    """The bind address accepts connections from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _metrics_table(metrics: dict[str, Any]) -> str:
    lines = ["image-level accuracy   images  teacher  student"]
    for split, entry in metrics.items():
        teacher = entry.get("teacher_accuracy", float("nan"))
        student = entry.get("student_accuracy", float("nan"))
        lines.append(f"{split:<22}{entry['images']:>7}{teacher:>9.3f}{student:>9.3f}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
