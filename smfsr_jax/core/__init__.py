"""Conventions shared by every layer (time grids, the flow-map sample and CFG mix, pixel ranges, the workdir
layout); these modules import nothing else of the package."""
