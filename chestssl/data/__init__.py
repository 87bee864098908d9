"""Data: sources (phantom, idc, tcia, local), preprocessing, datasets and transforms."""
