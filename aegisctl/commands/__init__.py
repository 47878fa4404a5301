"""One module per aegisctl verb."""
