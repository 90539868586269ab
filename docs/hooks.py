"""mkdocs hook: the docstrings' Sphinx roles (:class:`X`, :mod:`X`, ...) render as plain code.

The docstrings are written for Sphinx-style readers; mkdocstrings leaves the role names in the text
(":class:" before the code), so this drops them after rendering. Nothing else is changed.
"""

import re

_ROLE = re.compile(r":(?:class|mod|func|meth|attr|data|obj|exc|const):<code>[~.]*")


def on_page_content(html, page, config, files):
    return _ROLE.sub("<code>", html)
