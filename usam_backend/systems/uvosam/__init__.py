"""UVOSAM: video objects from box tracks — boxes linked into tracks, each track's boxes prompting SAM.

1. **Tracks** (:mod:`.tracks`, :func:`track_boxes`). Per-frame detections (boxes, scores, classes,
   appearance vectors) are linked at least total cost (Hungarian) in ByteTrack's two score stages,
   by motion (velocity, a gate that grows with the frames between sightings), class (a hard rule)
   and appearance. A track is kept if it was seen in at least ``min_hits`` frames and its mean score
   reaches ``min_score``; its class is the score-weighted majority of its detections' classes (ties:
   the lower class id). Tracks are numbered 1, 2, ... in order of first appearance, and keep that id
   in every frame.
2. **Masks** (:mod:`.segment`, :func:`segment_frames`). Each frame's track boxes prompt SAM (one
   mask per box, ``multimask_output=False``); frames where a track has no box get no mask for it.
   Two tracks whose masks are one object (the box of an occluded object gives SAM the object in
   front) keep it for the track whose box fits it best; the other gets no mask there. Other
   overlaps: masks are painted largest first, so where two tracks claim a pixel the smaller object
   (usually the one in front) keeps it.
3. **Following one object** (:mod:`.following`, :func:`follow_object`; an annotator's keyframe):
   from the keyframe's box or mask, SAM is prompted frame by frame in both directions with the box
   where the object was last found, moved on at its velocity and grown by ``margin``. A mask counts
   as the object only if its area and its colours stay close to the object's (else another object
   covers it); an object not found for ``lost_frames`` frames in a row is given up.
4. **One pass** (:mod:`.one_pass`, :func:`video_objects`; masks on every frame): each frame is
   encoded once; SAM follows every object from frame to frame, the head runs on every
   ``stride``-th frame's embedding, and its detections are linked to where SAM found the objects
   on that frame.

The head's regions become detections in :mod:`.detection` (:func:`detect`, :func:`head_detector`);
the box and mask helpers the modules share are in :mod:`._common`.

Where this deviates from the public code, and why: the public evaluation numbers a frame's objects
by counting non-empty masks, so an object's id shifts whenever another track is empty in a frame —
ids here are the track's own, in every frame; and later tracks do not simply overwrite earlier
ones (the largest-first rule above).
"""

from __future__ import annotations

from usam_backend.systems.uvosam._common import Detections, Lock, Sighting, mask_box
from usam_backend.systems.uvosam.detection import Detector, detect, detect_tracks, head_detector, name_tracks
from usam_backend.systems.uvosam.following import FollowOptions, follow_object, follow_objects, tracks_from_masks
from usam_backend.systems.uvosam.one_pass import video_objects
from usam_backend.systems.uvosam.segment import (
    TrackBoxes,
    boxes_by_frame,
    drop_duplicates,
    paint,
    segment_frames,
    segment_video,
)
from usam_backend.systems.uvosam.tracks import Track, TrackOptions, sampled_frames, track_boxes

__all__ = [
    "Detections",
    "Detector",
    "FollowOptions",
    "Lock",
    "Sighting",
    "Track",
    "TrackBoxes",
    "TrackOptions",
    "boxes_by_frame",
    "detect",
    "detect_tracks",
    "drop_duplicates",
    "follow_object",
    "follow_objects",
    "head_detector",
    "mask_box",
    "name_tracks",
    "paint",
    "sampled_frames",
    "segment_frames",
    "segment_video",
    "track_boxes",
    "tracks_from_masks",
    "video_objects",
]
