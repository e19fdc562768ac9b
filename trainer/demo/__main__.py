from trainer.demo.dates import main

main()
