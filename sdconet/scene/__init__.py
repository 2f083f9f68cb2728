"""Scene-scale inference: whole remote-sensing scenes (PNG/JPEG/TIFF/GeoTIFF) tiled through any runner."""
