"""paircurate: batch curation of paired image-text datasets on Apache Beam."""
import os as _os

# albumentations (imported by img2dataset) asks PyPI for its latest version on import.
_os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

__version__ = "0.1.0"
