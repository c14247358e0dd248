"""`featsvm serve`: a local web page for predictions and heatmaps of finished runs."""
