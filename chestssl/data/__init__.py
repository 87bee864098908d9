"""Data: sources (phantom, tcia, local), preprocessing, datasets and transforms."""
