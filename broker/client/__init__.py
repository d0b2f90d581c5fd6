"""The ``broker`` command line tool's client side: sign-in, sessions, credentials.

What the AWS tools need, without glue: ``broker login`` makes a CLI session at a broker
(``broker.client.login``), ``broker credential-process`` prints credentials for the AWS
``credential_process`` setting, cached until shortly before they expire
(``broker.client.credentials``), ``broker configure`` writes the profile
(``broker.client.aws_config``) and ``broker exec`` serves the container credentials
format to one child process (``broker.client.exec``).

Files (``BROKER_CLI_HOME``, else ``$XDG_CONFIG_HOME/broker``, else ``~/.config/broker``),
directories 0700 and files 0600, written atomically:

* ``sessions/<digest of the broker URL>.json``: the CLI session's bearer secret;
* ``credentials/<digest>.json``: cached credentials per broker, role and duration.
"""
