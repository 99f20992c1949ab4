"""What ties the engine into Odoo: the installer run by the addon's ``post_load``
(``odoo_install``) and the wrappers and routes it installs. Odoo is imported inside
functions only. Named so that its imports never read like Odoo's own."""
