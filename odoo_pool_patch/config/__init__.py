"""odoo.conf options: db_pooling's own (``options``, read from the ``[db_pooling]``
section by ``conf_file``), the TLS options (``tls``), Odoo's that interact with them
(``stock_options``), and the generated example and reference (``conf_example``)."""
