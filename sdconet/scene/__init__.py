"""Scene-scale inference: whole scenes of any size through any runner (docs/scenes.md).

``tiling`` (window layout, tile -> scene coordinates) and ``merge`` (one box per object across tiles) are pure NumPy
and copied into the Triton scene model; ``core`` runs a ``SceneReader`` (:mod:`sdconet.data.raster`) through a
``Runner``; ``cli`` is ``python -m sdconet.predict``; ``folder`` predicts a folder of images with a checkpoint
(``train/predict.py``).
"""
from sdconet.scene.merge import DEFAULT_MERGE_RULE, MERGE_RULES, merge_detections
from sdconet.scene.tiling import inner_edges, shift_boxes, tile_grid, tile_starts, touches_inner_edge

__all__ = ["DEFAULT_MERGE_RULE", "MERGE_RULES", "inner_edges", "merge_detections", "shift_boxes", "tile_grid",
           "tile_starts", "touches_inner_edge"]
