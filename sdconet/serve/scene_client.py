"""Moved: the scene client is :class:`sdconet.runtime.triton_client.TritonSceneClient` (re-exported here)."""
from sdconet.runtime.triton_client import SCENE_MODEL, SceneInput, TritonSceneClient  # noqa: F401
