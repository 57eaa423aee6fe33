"""Applications over the Python API: the run loop behind ``predict``, ``batch`` (local and Ray), PACS and the demo."""
