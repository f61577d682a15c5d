"""``ssageo serve``: a local localization page (:mod:`ssageo.serve.server`, its page and plot
in :mod:`ssageo.serve.page`)."""
