"""The web demo: the only place gradio is imported (ui, handlers, session); settings and the memory panel are plain Python."""
