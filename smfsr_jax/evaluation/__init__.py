"""Scoring SR images: the metric registry, directory scoring, checkpoint/benchmark runs, watch mode and the
paper tables (the metric networks are in models/)."""
