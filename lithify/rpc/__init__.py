"""Process-to-process calls: JSON over HTTP, every call authenticated with the instance secret."""
