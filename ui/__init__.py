"""The demo's UI: Gradio layout plus pure snapshot → figure functions (one view per module)."""
from ui.layout import CSS_PATH, build_ui, page_js

__all__ = ["CSS_PATH", "build_ui", "page_js"]
