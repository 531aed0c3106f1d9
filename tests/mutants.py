"""A mutation check: small, named breakages of usam's code, each of which some fast test must catch.

``.venv/bin/python tests/mutants.py`` copies the code to a temporary folder, runs the test files the
mutants name on the unmutated copy first (they must pass), then applies one mutant at a time
(an exact text replaced in one file) and runs its tests again: a mutant whose tests still pass
*survived*, which means a claim the README makes is not pinned. It prints one line per mutant and
exits with status 1 when any survived (or when a mutant's text is no longer in its file: it is then
*stale*, and the list needs updating).

    .venv/bin/python tests/mutants.py                 # every mutant
    .venv/bin/python tests/mutants.py --list          # their names
    .venv/bin/python tests/mutants.py rotation-ignored last-frame-not-sampled   # some of them

Each run of a test file costs its own start-up (torch, a tiny SAM): the whole list takes minutes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COPIED = (
    "usam_backend",
    "training",
    "tests",
    "label_config",
    "pyproject.toml",
    "Makefile",
    "README.md",
    "docker-compose.yml",
    "Dockerfile",
    "constraints.txt",
)


@dataclass(frozen=True)
class Mutant:
    """``old`` (exactly once in ``path``) replaced by ``new``; ``tests``: pytest arguments that must fail."""

    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


REFINE_TESTS = ("tests/test_refine.py", "-k", "oracle or corrupted or cascade or global or prompts")

MUTANTS: list[Mutant] = [
    # -- video files ------------------------------------------------------------------------------
    Mutant("rotation-ignored", "usam_backend/core/video.py",
           "turns = _quarter_turns(first[1].rotation)", "turns = 0",
           ("tests/test_video_io.py", "-k", "rotation")),
    Mutant("any-demuxer", "usam_backend/core/video.py",
           "    if demuxer is None:\n        raise VideoError(", "    if False:\n        raise VideoError(",
           ("tests/test_video_io.py", "-k", "demuxer or container")),
    Mutant("seek-overshoot-accepted", "usam_backend/core/video.py",
           "    if sought and first[0] > wanted.start:\n        raise _SeekOvershot",
           "    if False:\n        raise _SeekOvershot", ("tests/test_video_io.py", "-k", "seek")),
    Mutant("last-frame-not-sampled", "usam_backend/systems/uvosam/tracks.py",
           "return [*chosen, stop - 1] if chosen and chosen[-1] != stop - 1 else chosen", "return chosen",
           ("tests/test_sequences.py", "-k", "both_ends or short_sequence")),
    Mutant("one-sighting-tracks-dropped", "usam_backend/systems/uvosam/tracks.py",
           "if len(linked.seen) >= opts.min_hits", "if len(linked.seen) > opts.min_hits",
           ("tests/test_sequences.py", "-k", "one_frame")),
    # -- frame sequences and liveness ----------------------------------------------------------------
    Mutant("sequence-sizes-unchecked", "usam_backend/labelstudio/sequences.py",
           "        if size != first:\n", "        if False:\n",
           ("tests/test_sequences.py", "-k", "checked_before")),
    Mutant("sequence-budget-from-decoded-frames", "usam_backend/labelstudio/sequences.py",
           "        if len(refs) * size[0] * size[1] > limits.max_pixels:",
           "        if len(frames) * size[0] * size[1] > limits.max_pixels:",
           ("tests/test_sequences.py", "-k", "checked_before")),
    Mutant("lock-per-sequence", "usam_backend/labelstudio/sequences.py",
           "[frames[i] for i in chosen], segmenter, frame_indices=chosen, lock=lock,",
           "[frames[i] for i in chosen], segmenter, frame_indices=chosen, lock=None,",
           ("tests/test_sequences.py", "-k", "per_frame")),
    Mutant("sequence-ignores-deadline", "usam_backend/labelstudio/sequences.py",
           "    check = deadline_check(deadline)", "    check = None",
           ("tests/test_sequences.py", "-k", "budget")),
    Mutant("sequence-frames-fetched-per-stroke", "usam_backend/labelstudio/sequences.py",
           "            if self._key == cache_key:", "            if False:",
           ("tests/test_sequences.py", "-k", "session")),
    Mutant("video-lock-first-come-not-first-served", "usam_backend/sam/shared.py",
           "            self._turns.wait_for(lambda: self._serving == ticket)",
           "            self._turns.wait_for(lambda: self._serving <= ticket)",
           ("tests/test_sequences.py", "-k", "fair_lock or between_two_frames")),
    # -- video jobs --------------------------------------------------------------------------------
    Mutant("chunk-error-swallowed", "usam_backend/jobs/video.py",
           "        raise UsamError(reason) from None", "        return",
           ("tests/test_video_backend.py", "-k", "later_chunk")),
    Mutant("half-tracked-video-posted", "usam_backend/jobs/video.py",
           "        if errors:\n", "        if False:\n", ("tests/test_video_backend.py", "-k", "later_chunk")),
    Mutant("redis-claim-released-by-anyone", "usam_backend/jobs/video.py",
           "if redis.call('get', KEYS[1]) == ARGV[1] then", "if true then",
           ("tests/test_video_backend.py", "-k", "claims_in_redis")),
    Mutant("redis-claim-never-expires", "usam_backend/jobs/video.py",
           "nx=True, px=LINK_CLAIM_SECONDS * 1000", "nx=True",
           ("tests/test_video_backend.py", "-k", "claims_in_redis")),
    Mutant("chunk-settings-from-the-worker", "usam_backend/jobs/policy.py",
           "if isinstance(given, dict) else cls.from_settings(settings)", "if False else cls.from_settings(settings)",
           ("tests/test_video_backend.py", "-k", "carry_the_settings")),
    Mutant("video-downloaded-per-chunk", "usam_backend/jobs/video.py",
           "        if path.exists():\n", "        if False:\n", ("tests/test_video_backend.py", "-k", "downloads")),
    Mutant("failed-video-resubmitted-on-every-predict", "usam_backend/jobs/policy.py",
           "self._later(self._submit_all, pid, specs, False)", "self._later(self._submit_all, pid, specs, True)",
           ("tests/test_video_backend.py", "-k", "video_jobs_at_once")),
    Mutant("mixed-configs-accepted", "usam_backend/labelstudio/config.py",
           "    if used & set(videos) and used - set(videos):", "    if False:",
           ("tests/test_video_backend.py", "-k", "bad_configs")),
    Mutant("portrait-boxes-in-coded-frame", "usam_backend/jobs/video.py",
           "    height, width = clip.frames[0].shape[:2]", "    width, height = clip.frames[0].shape[:2]",
           ("tests/test_video_backend.py", "-k", "phone")),
    # -- trust -----------------------------------------------------------------------------------
    Mutant("stroke-header-trusted", "usam_backend/core/rle.py",
           "    if count != expected:\n", "    if False:\n", ("tests/test_rle.py",)),
    Mutant("fetch-deadline-per-read", "usam_backend/core/fetch.py",
           "            self._time_left(url, deadline)\n        return bytes(body)", "        return bytes(body)",
           ("tests/test_fetch_limits.py", "-k", "slow_body")),
    Mutant("urls-reported-whole", "usam_backend/core/fetch.py",
           "    netloc = parts.netloc.rpartition(\"@\")[2]", "    return url",
           ("tests/test_fetch_limits.py", "-k", "redact or credentials")),
    # -- evaluation ----------------------------------------------------------------------------------
    Mutant("eval-only-ids-present", "usam_backend/tools/eval_video.py",
           "        kept = list(range(1, largest + 1))", "        kept = [int(i) for i in ids]",
           ("tests/test_eval_video.py",)),
    # -- UO-SAM refinement, against the prompt-dependent oracle ----------------------------------------
    Mutant("refine-best-of-three-by-lowest-score", "usam_backend/systems/uosam.py",
           "    best = int(np.argmax(scores))", "    best = int(np.argmin(scores))", REFINE_TESTS),
    Mutant("refine-point-labels-swapped", "usam_backend/systems/uosam.py",
           "np.asarray(labels, dtype=np.int64)", "1 - np.asarray(labels, dtype=np.int64)", REFINE_TESTS),
    Mutant("refine-positive-point-only", "usam_backend/systems/uosam.py",
           "predictor.predict(point_coords=points, point_labels=labels, box=box, multimask_output=True)",
           "predictor.predict(point_coords=points[:1], point_labels=labels[:1], multimask_output=True)", REFINE_TESTS),
    Mutant("refine-points-as-yx", "usam_backend/systems/uosam.py",
           "return np.asarray(points, dtype=np.float32),", "return np.asarray(points, dtype=np.float32)[:, ::-1],",
           REFINE_TESTS),
    Mutant("refine-cascade-ignores-its-first-pass", "usam_backend/systems/uosam.py",
           "box=cascade_box, mask_input=low_res[best][None],", "box=box, mask_input=None,", REFINE_TESTS),
    Mutant("refine-no-cascade", "usam_backend/systems/uosam.py",
           "    if opts.cascade and mask.any():", "    if False and mask.any():", REFINE_TESTS),
    Mutant("refine-global-step-changes-nothing", "usam_backend/systems/uosam.py",
           "        result[segment] = values[int(np.argmax(counts))]", "        pass", REFINE_TESTS),
    Mutant("usam-refine-ignored", "usam_backend/labelstudio/tasks.py",
           "        mode = self.settings.refine\n", "        mode = \"off\"\n", ("tests/test_refine_setting.py",)),
    Mutant("usam-refine-drops-every-region", "usam_backend/labelstudio/tasks.py",
           "            mask = refined == i + 1\n", "            mask = refined == -1\n",
           ("tests/test_refine_setting.py",)),
    # -- video oracle, following and interactive prompts ----------------------------------------------
    Mutant("video-boxes-one-frame-late", "usam_backend/systems/uvosam/segment.py",
           "    boxes = by_frame.get(index, {})", "    boxes = by_frame.get(index - 1, {})",
           ("tests/test_video.py", "-k", "true_boxes")),
    Mutant("video-boxes-halved", "usam_backend/systems/uvosam/segment.py",
           "clipped = _clip_box(box, frame.shape)",
           "clipped = _clip_box(np.r_[(3 * box[:2] + box[2:]) / 4, (box[:2] + 3 * box[2:]) / 4], frame.shape)",
           ("tests/test_video.py", "-k", "true_boxes")),
    Mutant("video-duplicates-kept", "usam_backend/systems/uvosam/segment.py",
           "    kept = dict(masks)\n", "    return masks\n", ("tests/test_video.py", "-k", "behind_another")),
    Mutant("followed-regions-dropped", "usam_backend/labelstudio/tasks.py",
           "for index, m in found.items()", "for index, m in {}.items()",
           ("tests/test_video_backend.py", "-k", "followed_on_the_other_frames")),
    Mutant("prompt-points-as-yx", "usam_backend/labelstudio/interactive.py",
           "[[x * width / 100, y * height / 100] for x, y in self.points]",
           "[[y * height / 100, x * width / 100] for x, y in self.points]", ("tests/test_prompts.py",)),
    Mutant("prompt-negative-click-positive", "usam_backend/labelstudio/interactive.py",
           "point_labels.append(0 if item.get(\"is_positive\") is False else 1)",
           "point_labels.append(1 if item.get(\"is_positive\") is False else 0)", ("tests/test_prompts.py",)),
    Mutant("prompt-box-as-width-height", "usam_backend/labelstudio/interactive.py",
           "(x + w) * width / 100, (y + h) * height / 100", "w * width / 100, h * height / 100",
           ("tests/test_prompts.py",)),
    Mutant("prompt-worst-of-three", "usam_backend/systems/prompts.py",
           "best = int(np.argmax(result.iou_predictions))", "best = int(np.argmin(result.iou_predictions))",
           ("tests/test_prompts.py",)),
    # -- service claims ----------------------------------------------------------------------------
    Mutant("docs-without-auth", "usam_backend/server/app.py",
           "    _install_docs(app, protected)\n", "    _install_docs(app, [])\n",
           ("tests/test_server.py", "-k", "needs_basic_auth")),
    Mutant("admission-limit-ignored", "usam_backend/server/app.py",
           "    admission = Admission(settings.max_pending_predictions)\n", "    admission = Admission(8)\n",
           ("tests/test_load.py", "-k", "exactly")),
    Mutant("webhook-not-fsynced", "usam_backend/labelstudio/projects.py",
           "            out.flush()\n            os.fsync(out.fileno())\n", "",
           ("tests/test_durability.py", "-k", "fsynced")),
    Mutant("task-score-ignores-threshold", "usam_backend/core/regions.py",
           "    return float(np.where(p >= threshold, p, 1.0 - p).mean())\n",
           "    return float(np.where(p >= 0.5, p, 1.0 - p).mean())\n", ("tests/test_feedback.py", "-k", "task_score")),
    Mutant("task-score-one-minus-mean", "usam_backend/core/regions.py",
           "    return float(np.where(p >= threshold, p, 1.0 - p).mean())\n", "    return float(1.0 - p.mean())\n",
           ("tests/test_feedback.py", "-k", "task_score")),
    Mutant("calibration-does-nothing", "training/calibration.py",
           "    best = int(np.argmin(nll))\n", "    best = int(np.argmin(np.abs(np.log(TEMPERATURES))))\n",
           ("tests/test_feedback.py", "-k", "temperature")),
    Mutant("s3-skipped-when-required", "tests/conftest.py",
           "            pytest.fail(f\"{module} cannot be imported",
           "            pytest.skip(f\"{module} cannot be imported",
           ("tests/test_pins.py", "-k", "required_s3")),
    Mutant("dtd-accepted", "usam_backend/labelstudio/config.py",
           "    if \"<!DOCTYPE\" in xml or \"<!ENTITY\" in xml:\n", "    if False:\n",
           ("tests/test_trust.py", "-k", "dtd")),
    Mutant("basic-auth-to-any-host", "usam_backend/labelstudio/media.py",
           "        if basic_auth and host_allowed(urlsplit(url).hostname or \"\", self.limits.allowed_hosts):\n",
           "        if basic_auth:\n", ("tests/test_trust.py", "-k", "allow_listed")),
    Mutant("token-not-renewed", "usam_backend/labelstudio/media.py",
           "            self.auth.header(renew=True)\n", "            self.auth.header()\n",
           ("tests/test_trust.py", "-k", "renewed")),
    Mutant("every-mask-upscaled", "usam_backend/systems/usam.py",
           "        return self.segmenter.engine.upscale(self.candidates.logits[i : i + 1], self.embedding)[0]\n",
           "        return self.segmenter.engine.upscale(self.candidates.logits, self.embedding)[i]\n",
           ("tests/test_inference.py", "-k", "upscaled_one_at_a_time")),
    Mutant("heads-rescanned-always", "usam_backend/registry.py",
           "        if known is not None and known.stamp == stamp:\n", "        if False:\n",
           ("tests/test_pins.py", "-k", "rescanned")),
]  # fmt: skip


def copy_tree(target: Path) -> None:
    for name in COPIED:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, target / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(source, target / name)


def run_tests(folder: Path, tests: tuple[str, ...]) -> tuple[bool, float]:
    """Whether the tests passed in ``folder`` (its code imported first), and how long they took; a
    failure's summary is kept in ``folder/last-run.txt``."""
    env = {**os.environ, "PYTHONPATH": str(folder), "PYTHONDONTWRITEBYTECODE": "1"}
    started = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
                         cwd=folder, env=env, capture_output=True, text=True, check=False)  # fmt: skip
    (folder / "last-run.txt").write_text(run.stdout[-3000:] + run.stderr[-2000:])
    if run.returncode == 5:
        raise SystemExit(f"no test selected by {' '.join(tests)}: the mutant list needs updating")
    return run.returncode == 0, time.monotonic() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="only these mutants")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    args = parser.parse_args()
    chosen = [m for m in MUTANTS if not args.names or m.name in args.names]
    if args.list:
        for m in MUTANTS:
            print(f"{m.name:<44} {m.path}  [{' '.join(m.tests)}]")
        return 0
    unknown = set(args.names) - {m.name for m in MUTANTS}
    if unknown:
        raise SystemExit(f"unknown mutants: {', '.join(sorted(unknown))} (see --list)")
    survived = stale = 0
    with tempfile.TemporaryDirectory(prefix="usam-mutants-") as folder:
        copy = Path(folder)
        copy_tree(copy)
        files = sorted({t for m in chosen for t in m.tests if t.startswith("tests/")})
        passed, _ = run_tests(copy, tuple(files))  # every test file involved, once, unmutated
        if not passed:
            raise SystemExit(f"tests fail without any mutant: fix that first\n{(copy / 'last-run.txt').read_text()}")
        for mutant in chosen:
            target = copy / mutant.path
            original = target.read_text()
            if original.count(mutant.old) != 1:
                print(f"STALE     {mutant.name}: its text is in {mutant.path} {original.count(mutant.old)} times")
                stale += 1
                continue
            target.write_text(original.replace(mutant.old, mutant.new))
            try:
                passed, seconds = run_tests(copy, mutant.tests)
            finally:
                target.write_text(original)
            verdict = "SURVIVED" if passed else "killed"
            survived += passed
            print(f"{verdict:<9} {mutant.name:<44} {seconds:5.1f} s  {' '.join(mutant.tests)}", flush=True)
    print(f"{len(chosen)} mutants: {len(chosen) - survived - stale} killed, {survived} survived, {stale} stale")
    return 1 if survived or stale else 0


if __name__ == "__main__":
    sys.exit(main())
