"""The demo's UI: Gradio layout plus pure snapshot → figure functions (one view per module)."""
from ui.gradio_import import skip_stub_writer

skip_stub_writer()  # before anything below imports gradio

from ui.layout import CSS_PATH, build_ui, page_js  # noqa: E402

__all__ = ["CSS_PATH", "build_ui", "page_js"]
