from bench.entry import main

main()
