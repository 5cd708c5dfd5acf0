"""Stand-alone example scripts that ``labelflow export`` copies into an export folder as
``example.py``: each classifies images with the exported model and its ``model_card.json``
alone (no labelflow), so they import only the runtime of their format, numpy and Pillow."""
