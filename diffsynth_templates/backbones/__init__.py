"""backbones layer (see DESIGN.md section 3)."""
