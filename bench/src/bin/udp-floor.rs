//! `udp-floor [RECEIVERS,...] [DATAGRAM_BYTES] [ROUNDS]`: the machine's floor
//! for a delivery (see `tiercast_bench::udp_floor`), one line of JSON per
//! receiver count. Defaults: 1000,4000 receivers, 150 bytes, 200 rounds.

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let parse = |i: usize, d: &str| args.get(i).map_or(d, String::as_str).to_owned();
    let receivers: Result<Vec<usize>, _> =
        parse(0, "1000,4000").split(',').map(str::parse).collect();
    let (Ok(receivers), Ok(bytes), Ok(rounds)) = (
        receivers,
        parse(1, "150").parse::<usize>(),
        parse(2, "200").parse::<usize>(),
    ) else {
        eprintln!("udp-floor: usage: udp-floor [RECEIVERS,...] [DATAGRAM_BYTES] [ROUNDS]");
        return std::process::ExitCode::from(64);
    };
    for n in receivers {
        match tiercast_bench::udp_floor::measure(n, bytes, rounds) {
            Ok(f) => println!("{}", serde_json::to_string(&f).expect("plain struct")),
            Err(e) => {
                eprintln!("udp-floor: {n} receivers: {e}");
                return std::process::ExitCode::FAILURE;
            }
        }
    }
    std::process::ExitCode::SUCCESS
}
