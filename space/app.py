"""Quiver as a Hugging Face Space: the same app as ``quiver app``, served on the Space's port.

Space variables choose what the chat runs on: ``QUIVER_REGISTRY`` (``hf``, a Hub URL or a folder)
and ``QUIVER_LIBRARY`` (a library repo id there); without them, the built-in demo library. A
``HF_TOKEN`` secret is used for private repos; visitors push libraries with the login button.
"""

import os

from quiver.app import serve

if __name__ == "__main__":
    serve(
        os.environ.get("QUIVER_REGISTRY") or None,
        os.environ.get("QUIVER_LIBRARY") or None,
        token=os.environ.get("HF_TOKEN") or None,
        host="0.0.0.0",
        port=int(os.environ.get("GRADIO_SERVER_PORT", "7860")),
    ).block_thread()
