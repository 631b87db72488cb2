"""tdxtrace's built-in analyzers, installed as the package ``tdxtrace_plugins``.

Each module is an ordinary tdxtrace plugin registered through the ``tdxtrace`` entry-point
group, exactly as a third-party package would be; they use only tdxtrace's public API.
"""
