"""Data files shipped with the package: the default gene space, human TFs and GO biological-process programmes."""
