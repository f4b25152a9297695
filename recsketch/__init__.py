"""recsketch: visual "more like this" recommendations for the Sketchfab catalogue."""

__version__ = "0.1.0"
