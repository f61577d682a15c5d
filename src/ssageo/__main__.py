from ssageo.cli import main

main()
