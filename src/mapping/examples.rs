//! The example mapping files shipped in `mappings/`, embedded so the demo runs without a
//! checkout. The same files are what a billing engineer copies as a starting point.

/// `(display name, YAML text)` of the example mappings, in load order.
pub const EXAMPLE_MAPPINGS: &[(&str, &str)] = &[
    (
        "mappings/customers.yaml",
        include_str!("../../mappings/customers.yaml"),
    ),
    (
        "mappings/accounts.csv",
        include_str!("../../mappings/accounts.csv"),
    ),
    (
        "mappings/jelastic.yaml",
        include_str!("../../mappings/jelastic.yaml"),
    ),
    (
        "mappings/metalsoft.yaml",
        include_str!("../../mappings/metalsoft.yaml"),
    ),
    (
        "mappings/sakura.yaml",
        include_str!("../../mappings/sakura.yaml"),
    ),
    (
        "mappings/softlayer.yaml",
        include_str!("../../mappings/softlayer.yaml"),
    ),
];
