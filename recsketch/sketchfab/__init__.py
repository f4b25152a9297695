"""Sketchfab API: the client the crawler uses and a local server that answers like it."""
