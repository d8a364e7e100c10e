"""The route switch, ``reference_mode()`` and ``in_reference_mode()``: see ``tf_jacbp.route``.

Kept so that ``from tf_jacbp.mode import reference_mode`` keeps working.
"""

from tf_jacbp.route import in_reference_mode, reference_mode

__all__ = ["in_reference_mode", "reference_mode"]
