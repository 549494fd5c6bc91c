"""Code the tests and the benches share, kept out of the installed package.

pytest puts ``tests/`` on ``sys.path`` (``tests/conftest.py`` has no package above it); a bench script adds it
itself before importing from here.
"""
