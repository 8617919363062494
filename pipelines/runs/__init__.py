"""A finished run read back: results, report, FID / KID / IS / precision-recall (`promptmill report`, `evaluate`)."""
